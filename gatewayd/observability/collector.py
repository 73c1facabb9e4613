"""Metrics read from the components when Prometheus scrapes, instead of kept up to date on every change:
device availability, queue depth per device, and the uplink's state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gatewayd.app.supervisor import Supervisor


class GatewayCollector(Collector):
    def __init__(self, sup: Supervisor):
        self._sup = sup

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
        devices = self._sup.devices
        dispatcher = self._sup.dispatcher
        if devices is not None:
            for name, device in devices.devices.items():
                available.add_metric([name], 1.0 if device.availability.available else 0.0)
        if dispatcher is not None:
            for name, state in dispatcher.snapshot()["per_device"].items():
                queued.add_metric([name], float(state["queued"]))
                executing.add_metric([name], 0.0 if state["executing"] is None else 1.0)
        yield available
        yield queued
        yield executing
