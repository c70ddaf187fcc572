"""Length-prefixed msgpack frames between the node agent and its sandboxes.

One frame: a 4-byte big-endian length, then a msgpack map with a "type" key. The node side
uses asyncio streams; the sandbox side a blocking socket.
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


def unpack(body: bytes) -> dict[str, Any]:
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Next frame; asyncio.IncompleteReadError when the peer closed the socket."""
    return (await read_sized_frame(reader, max_bytes))[0]


async def read_sized_frame(reader: asyncio.StreamReader, max_bytes: int) -> tuple[dict[str, Any], int]:
    """Next frame and its size in bytes; ValueError (before reading it) when it is larger
    than `max_bytes`, or not a map with a "type"."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > max_bytes:
        raise ValueError(f"frame of {size} bytes exceeds {max_bytes}")
    frame = unpack(await reader.readexactly(size))
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise ValueError("a frame must be a map with a type")
    return frame, size


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """Blocking read of the next frame; None on EOF (the node went away)."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    body = _recv_exactly(sock, size)
    return None if body is None else unpack(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def send_frame_with_fds(sock: socket.socket, frame: dict[str, Any], fds: list[int]) -> None:
    """Blocking send of one frame with file descriptors attached (SCM_RIGHTS)."""
    data = pack(frame)
    sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
    sock.sendall(data[sent:])


class FrameReader:
    """Blocking reads of frames and the descriptors sent with them from a socket on which
    the peer may send several frames back to back (a sandbox's invokes and cancels)."""

    def __init__(self, sock: socket.socket, max_fds: int = 8) -> None:
        self.sock = sock
        self.max_fds = max_fds
        self._buf = bytearray()
        self._fds: list[int] = []

    def next(self) -> tuple[dict[str, Any] | None, list[int]]:
        """The next frame and the descriptors that arrived with it; (None, fds) on EOF."""
        while True:
            if len(self._buf) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buf)
                end = _HEADER.size + size
                if len(self._buf) >= end:
                    frame = unpack(bytes(self._buf[_HEADER.size:end]))
                    del self._buf[:end]
                    fds, self._fds = self._fds, []
                    return frame, fds
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, self.max_fds)
            self._fds += fds
            if not data:
                return None, self._fds
            self._buf += data


def recv_frame_with_fds(sock: socket.socket, max_fds: int = 8) -> tuple[dict[str, Any] | None, list[int]]:
    """Blocking read of one frame and the descriptors sent with it; (None, []) on EOF. Only
    where the peer sends one frame and waits for the answer (bytes past it are lost)."""
    return FrameReader(sock, max_fds).next()
