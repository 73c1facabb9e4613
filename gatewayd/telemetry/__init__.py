"""Telemetry and events from devices, on their way to the store's outbox (and from there to the uplink)."""

from gatewayd.telemetry.sink import MemorySink, Record, TelemetrySink

__all__ = ["MemorySink", "Record", "TelemetrySink"]
