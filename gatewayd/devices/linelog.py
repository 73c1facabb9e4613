"""The simulators' append-only logs: one JSON line per action a simulated device performed.

Each line is one ``write()``, so it survives a kill -9 of the process. A line that cannot be written (the disk is
full) is kept in memory, in order, and written before the next one, or on close: a full disk delays the log but
neither loses it (while the process lives) nor stops the simulated device, which in mock mode runs inside the
daemon. The first failure is logged once, and so is the recovery.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import structlog

log = structlog.get_logger("gatewayd.simulator")


class LineLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._unwritten: deque[bytes] = deque()
        self._failing: str | None = None

    @property
    def unwritten(self) -> int:
        return len(self._unwritten)

    def append(self, line: bytes) -> None:
        self._unwritten.append(line + b"\n")
        self.flush()

    def flush(self) -> bool:
        """Write what waits; False if some of it still could not be written."""
        while self._unwritten:
            data = self._unwritten[0]
            try:
                n = os.write(self._fd, data)
                if n == 0:
                    raise OSError(28, os.strerror(28))
            except OSError as err:
                if self._failing is None:
                    self._failing = err.strerror or str(err)
                    log.warning("simulator_log_not_written", path=str(self.path), error=self._failing)
                return False
            if n < len(data):  # part of it fitted: the rest follows, so the line is whole in the file
                self._unwritten[0] = data[n:]
                continue
            self._unwritten.popleft()
        if self._failing is not None:
            log.info("simulator_log_written", path=str(self.path))
            self._failing = None
        return True

    def close(self) -> None:
        self.flush()
        os.close(self._fd)
