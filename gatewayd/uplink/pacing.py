"""How fast the backlog goes out: a window of messages awaiting their PUBACK, steered by how long PUBACKs take.

The drain keeps up to ``size`` outbox messages in flight and sends the next one as each acknowledgement comes back,
so its pace is the broker's: no fixed rate to guess, too slow for a local broker and too fast for one behind a
cellular link. The window is steered as TCP steers its own (additive increase, multiplicative decrease), on delay
rather than loss, as LEDBAT does: an acknowledgement that took much longer than the fastest seen lately
(``slow_factor`` times, and more than ``slow_floor_s``: a busy gateway's own event loop delays a local broker's
acknowledgements by tens of milliseconds, no queue worth cutting for) means messages are queueing somewhere, at the
broker or on the link, and the window is halved, at most once per round trip; otherwise it grows by about one
message per round trip, up to ``maximum``. Live telemetry and results go out beside it and are not held back by it:
a queue the drain built would delay them too, which is what the cut avoids.

Pure bookkeeping, no I/O, time injected: the uplink reads :attr:`size` and reports each :meth:`acked`.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class AckWindow:
    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 1,
        initial: int | None = None,
        slow_factor: float = 4.0,
        slow_floor_s: float = 0.25,
        base_epoch_s: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        if not 1 <= minimum <= maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        self.maximum = maximum
        self.minimum = minimum
        self._size = float(min(maximum, max(minimum, initial if initial is not None else maximum)))
        self.slow_factor = slow_factor
        self.slow_floor_s = slow_floor_s
        self._epoch_s = base_epoch_s
        self._now = monotonic
        # The fastest acknowledgement of this epoch and of the last: the base the others are compared with, which
        # forgets a route that got slower for good within two epochs.
        self._epoch_start = monotonic()
        self._base_now: float | None = None
        self._base_before: float | None = None
        self._last_cut = float("-inf")
        self.cuts = 0

    @property
    def size(self) -> int:
        return int(self._size)

    @property
    def base_s(self) -> float | None:
        values = [b for b in (self._base_now, self._base_before) if b is not None]
        return min(values) if values else None

    def acked(self, latency_s: float) -> None:
        """One message acknowledged ``latency_s`` after it was handed to the client."""
        now = self._now()
        if now - self._epoch_start >= self._epoch_s:
            self._epoch_start, self._base_before, self._base_now = now, self._base_now, None
        if self._base_now is None or latency_s < self._base_now:
            self._base_now = latency_s
        base = self.base_s
        assert base is not None
        slow = latency_s > max(self.slow_floor_s, base * self.slow_factor)
        if slow:
            if now - self._last_cut >= latency_s:  # once per round trip: the rest of the window was sent before
                self._size = max(float(self.minimum), self._size / 2)
                self._last_cut = now
                self.cuts += 1
            return
        self._size = min(float(self.maximum), self._size + 1 / self._size)
