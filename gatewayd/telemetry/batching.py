"""Several readings in one MQTT message ([telemetry] batch): pure functions, no I/O.

``"off"``: each record its own message, as it always was. ``"device"``: the readings of one device together, on
``telemetry/<device>``. ``"gateway"``: the readings of every device together, on ``telemetry``. A batch is
``{"samples": [reading, ...]}``, each reading exactly the message it would have been alone (device, values, ts,
clock_synced, and seq when it comes from the outbox), so a consumer reads one shape inside and outside batches.
Results and events are never batched. Order is kept: within a device, readings are in the order given; a batch
takes at most ``limit`` readings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

BatchMode = Literal["off", "device", "gateway"]
GATEWAY_TOPIC = "telemetry"


class Sendable(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def topic(self) -> str: ...

    def message(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Message:
    topic: str  # below gatewayd/{gateway_id}/
    payload: bytes
    items: tuple[int, ...]  # indices of the records it carries, in the sequence given

    @property
    def telemetry(self) -> bool:
        return self.topic == GATEWAY_TOPIC or self.topic.startswith("telemetry/")


def messages(records: Sequence[Sendable], mode: BatchMode, limit: int) -> list[Message]:
    """The messages that carry ``records``, in order."""
    if mode == "off":
        return [Message(r.topic, r.message(), (i,)) for i, r in enumerate(records)]
    out: list[tuple[str, list[bytes], list[int]] | Message] = []
    open_batch: dict[str, int] = {}  # topic -> index in out of the batch still taking readings
    for i, r in enumerate(records):
        if r.kind != "telemetry":
            out.append(Message(r.topic, r.message(), (i,)))
            continue
        topic = r.topic if mode == "device" else GATEWAY_TOPIC
        at = open_batch.get(topic)
        entry = out[at] if at is not None else None
        if isinstance(entry, tuple) and len(entry[2]) < limit:
            entry[1].append(r.message())
            entry[2].append(i)
            continue
        open_batch[topic] = len(out)
        out.append((topic, [r.message()], [i]))
    return [
        e if isinstance(e, Message) else Message(e[0], b'{"samples":[' + b",".join(e[1]) + b"]}", tuple(e[2]))
        for e in out
    ]
