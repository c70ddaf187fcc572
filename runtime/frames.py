"""Length-prefixed msgpack frames between the node agent and its sandboxes.

One frame: a 4-byte big-endian length, then a msgpack map with a "type" key. The node side
uses asyncio streams; the sandbox side a blocking socket (it serves one request at a time).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 256 * 1024 * 1024


def pack(frame: dict[str, Any]) -> bytes:
    body = msgpack.packb(frame, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def _unpack(body: bytes) -> dict[str, Any]:
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Next frame; asyncio.IncompleteReadError when the peer closed the socket."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    return _unpack(await reader.readexactly(size))


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """Blocking read of the next frame; None on EOF (the node went away)."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    body = _recv_exactly(sock, size)
    return None if body is None else _unpack(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
