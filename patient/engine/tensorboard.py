"""A minimal TensorBoard event-file writer (scalars only), without TensorFlow.

An event file is a TFRecord stream of `Event` protocol buffers: each record is the payload length (uint64 LE), its
masked CRC-32C, the payload, and the payload's masked CRC-32C. The few protobuf fields needed are encoded by hand:
Event{1: wall_time double, 2: step int64, 3: file_version string, 5: summary} and
Summary{1: Value{1: tag string, 2: simple_value float}}.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    key = _varint((num << 3) | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def _event(step: int, *, wall_time: float, summary: bytes | None = None, file_version: str | None = None) -> bytes:
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if summary is not None:
        out += _field(5, 2, summary)
    return out


class EventWriter:
    """Append scalar summaries to `<logdir>/events.out.tfevents.<time>.<host>`, readable by TensorBoard."""

    def __init__(self, logdir):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._f = open(self.path, "ab")
        self._write(_event(0, wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, payload: bytes) -> None:
        header = struct.pack("<Q", len(payload))
        self._f.write(header + struct.pack("<I", _masked(header)) + payload + struct.pack("<I", _masked(payload)))

    def scalars(self, step: int, values: dict) -> None:
        summary = b"".join(
            _field(1, 2, _field(1, 2, str(tag).encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in values.items())
        self._write(_event(int(step), wall_time=time.time(), summary=summary))
        self._f.flush()

    def close(self) -> None:
        self._f.close()
