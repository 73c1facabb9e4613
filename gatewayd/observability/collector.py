"""Metrics read from the components when Prometheus scrapes, instead of kept up to date on every change:
device availability, queue depth per device, and the asyncio tasks alive in the daemon's event loop (the soak,
bench/soak.py, watches that count: a number that keeps growing under steady load is a leak)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gatewayd.commands.dispatcher import Dispatcher
    from gatewayd.devices.manager import DeviceManager


class GatewayCollector(Collector):
    def __init__(
        self,
        devices: Callable[[], DeviceManager | None],
        dispatcher: Callable[[], Dispatcher | None],
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        self._devices, self._dispatcher = devices, dispatcher
        # The daemon's loop, taken now: a scrape may also come from a thread without a running loop (tests).
        self._loop = loop or asyncio.get_running_loop()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        available = GaugeMetricFamily(
            "gatewayd_device_available", "1 when the device can be reached, 0 when not.", labels=["device"]
        )
        queued = GaugeMetricFamily(
            "gatewayd_queue_depth",
            "Commands waiting for the device (not counting the one executing).",
            labels=["device"],
        )
        executing = GaugeMetricFamily("gatewayd_executing", "1 while a command runs on the device.", labels=["device"])
        devices = self._devices()
        dispatcher = self._dispatcher()
        if devices is not None:
            for name, device in devices.devices.items():
                available.add_metric([name], 1.0 if device.availability.available else 0.0)
        if dispatcher is not None:
            for name, state in dispatcher.snapshot()["per_device"].items():
                queued.add_metric([name], float(state["queued"]))
                executing.add_metric([name], 0.0 if state["executing"] is None else 1.0)
        tasks = GaugeMetricFamily(
            "gatewayd_asyncio_tasks",
            "Asyncio tasks not yet done in the daemon's event loop (components' tasks, HTTP connections, streams).",
            value=float(len(asyncio.all_tasks(self._loop))),  # all_tasks: the ones not done
        )
        yield available
        yield queued
        yield executing
        yield tasks
