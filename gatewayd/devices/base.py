"""What every device looks like to the dispatcher, whatever bus or pin it is on."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from gatewayd.config.profiles import Profile

log = structlog.get_logger("gatewayd.devices")


@dataclass
class Availability:
    """Availability is state, not a log stream: it is logged once when it goes down and once when it returns."""

    subject: str
    available: bool = False
    last_error: str | None = None
    since: float = field(default_factory=time.time)
    # Wall times, for display: when the latest outage began and when its latest error was seen. After a recovery
    # they stay, so a page can say "could not open the port 3 min ago, back 12 s later" rather than a bare error.
    down_at: float | None = None
    last_error_at: float | None = None
    # Called with the new value on every change (the dispatcher wakes the device's held commands).
    listeners: list[Callable[[bool], None]] = field(default_factory=list, repr=False, compare=False)

    def up(self) -> None:
        if not self.available:
            self.available, self.since = True, time.time()
            log.info("device_available", device=self.subject)
            self._tell(True)

    def down(self, error: str) -> None:
        now = time.time()
        self.last_error, self.last_error_at = error, now
        changed = self.available or self.since == 0
        if changed:
            log.warning("device_unavailable", device=self.subject, error=error)
            self.since = self.down_at = now
        self.available = False
        if changed:
            self._tell(False)

    def _tell(self, available: bool) -> None:
        for listener in list(self.listeners):
            try:
                listener(available)
            except Exception:  # a listener's bug must not stop the bus that reported the change
                log.exception("availability_listener_failed", device=self.subject)

    def to_api(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "last_error": self.last_error,
            "since": self.since,
            "down_at": self.down_at,
            "last_error_at": self.last_error_at,
        }


class Device(Protocol):
    """One addressable device. ``execute`` performs one action and returns the device's result.

    It raises :class:`~gatewayd.errors.DeviceRejected` when the device refuses, and a transient
    :class:`~gatewayd.errors.DeviceUnavailable` / :class:`~gatewayd.errors.DeviceTimeout` when it cannot be
    reached. ``command_id`` travels with the request where the transport allows, so that a device that saw the
    request before (a retry after a crash) answers without acting twice.
    """

    name: str
    profile: Profile

    @property
    def availability(self) -> Availability: ...

    async def execute(self, command_id: str, action: str, params: dict[str, Any]) -> dict[str, Any]: ...

    def describe(self) -> dict[str, Any]: ...
