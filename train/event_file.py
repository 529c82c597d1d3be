"""A minimal TensorBoard event-file writer (scalars only), with no TensorFlow dependency.

Neither tensorboard, tensorboardX nor TensorFlow is a dependency, so this writes the format
directly: a TFRecord stream (length, masked CRC32C, payload, masked CRC32C) of `Event` protocol
buffers, hand-encoded:
    Event   {1: wall_time double, 2: step int64, 3: file_version string, 5: summary Summary,
             6: session_log SessionLog}
    SessionLog {1: status enum (1 = START)}: TensorBoard drops the earlier events of steps >=
             this event's step (a resumed run replays the steps after its checkpoint)
    Summary {1: repeated Value};  Value {1: tag string, 2: simple_value float}
TensorBoard reads the file written to `<workdir>/tensorboard/events.out.tfevents.*`.
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float,
    step: int,
    *,
    scalars: dict[str, float] | None = None,
    file_version: str | None = None,
) -> bytes:
    """One serialized `Event` proto."""
    out = bytearray(_varint(1 << 3 | 1) + struct.pack("<d", wall_time))
    out += _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _field_bytes(
                1,
                _field_bytes(1, tag.encode())
                + _varint(2 << 3 | 5)
                + struct.pack("<f", float(value)),
            )
            for tag, value in scalars.items()
        )
        out += _field_bytes(5, summary)
    return bytes(out)


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", _masked_crc(length))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


class EventFileWriter:
    """Appends scalar summaries to a fresh events file in `logdir`."""

    def __init__(self, logdir: str, restart_step: int | None = None):
        """`restart_step`: the first step this writer will log again (a resumed run); earlier
        files' events from that step on are superseded (a SessionLog START at that step)."""
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._f.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
        if restart_step is not None:
            start = _field_bytes(6, _varint(1 << 3 | 0) + _varint(1))  # session_log START
            event = encode_event(time.time(), restart_step) + start
            self._f.write(frame_record(event))
        self._f.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._f.write(frame_record(encode_event(time.time(), step, scalars=values)))
        self._f.flush()

    def close(self) -> None:
        self._f.close()
