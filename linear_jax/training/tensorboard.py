"""TensorBoard scalars without TensorFlow: an `events.out.tfevents.*` file written by hand.

The format is a TFRecord file of `tensorflow.Event` protocol buffers. Each record is
`uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)` (little endian);
the first event carries `file_version = "brain.Event:2"`, every other one a wall time, a step and a
`Summary` of `(tag, simple_value)` pairs. The few protobuf fields needed are encoded here
(field numbers from tensorflow/core/util/event.proto and framework/summary.proto), and CRC-32C is
a table in pure Python: no dependency. `read_scalars` parses the file back (for tests).
"""

from __future__ import annotations

import pathlib
import socket
import struct
import time

_POLY = 0x82F63B78                            # CRC-32C (Castagnoli), reflected
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _field(3, 2, file_version.encode())
    if scalars:
        values = b"".join(_field(1, 2, _field(1, 2, tag.encode()) +
                                 _field(2, 5, struct.pack("<f", float(v))))
                          for tag, v in scalars.items())
        msg += _field(5, 2, values)
    return msg


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked(length)) + data + struct.pack("<I", _masked(data))


class EventWriter:
    """Appends scalar summaries to a new `events.out.tfevents.<time>.<host>` file in `logdir`."""

    def __init__(self, logdir):
        logdir = pathlib.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        with self.path.open("ab") as f:
            f.write(_record(_event(now, 0, file_version="brain.Event:2")))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with self.path.open("ab") as f:
            f.write(_record(_event(time.time(), int(step), scalars=values)))


# --- reading back (tests) ------------------------------------------------------------------------
def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return n, i


def _fields(buf: bytes):
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 2:
            size, i = _read_varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"wire type {wire}")
        yield number, value


def read_scalars(path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file; checks both CRCs of every record."""
    data, i, out = pathlib.Path(path).read_bytes(), 0, []
    while i < len(data):
        header, (length,) = data[i:i + 8], struct.unpack("<Q", data[i:i + 8])
        if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked(header):
            raise ValueError(f"bad length crc at byte {i}")
        body = data[i + 12:i + 12 + length]
        if struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] != _masked(body):
            raise ValueError(f"bad data crc at byte {i}")
        i += 16 + length
        event = dict(_fields(body))
        step = event.get(2, 0)
        for number, value in _fields(event.get(5, b"")):
            if number == 1:
                v = dict(_fields(value))
                out.append((step, v[1].decode(), struct.unpack("<f", v[2])[0]))
    return out
