from gatewayd.store.db import Store, open_database

__all__ = ["Store", "open_database"]
