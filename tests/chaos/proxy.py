"""A TCP proxy between one node and Redis that can cut, delay and freeze its connections.

Each node reaches Redis through a :class:`FaultProxy` of its own, run on the harness's event
loop, so a fault hits that node only. The proxy tells the node's two kinds of connection apart
by sniffing the first real command on each (see :func:`classify`): the transport's subscriber
connection starts with ``SUBSCRIBE``; its command connection (and any other client of the
node, such as the example app's queues) with anything else (``PING``, ``EVALSHA``,
``PUBLISH``, ``XADD`` ...). The handshake redis-py sends first on every connection (``HELLO``,
``AUTH``, ``CLIENT SETINFO``/``SETNAME``, ``SELECT``) passes through before that.

Faults, each on ``"subscriber"`` connections, ``"command"`` connections, or both:

- :meth:`FaultProxy.cut` with ``mode="reset"``: open connections are reset (RST) and new ones
  are reset once classified (at once, when both kinds are cut), until :meth:`heal`: a
  firewall rule with ``REJECT``, a crashed middlebox.
- :meth:`FaultProxy.cut` with ``mode="drop"``: nothing passes either way (a ``DROP`` rule);
  what was sent meanwhile is delivered late when the fault heals, as TCP would retransmit it.
  New connections are accepted and held too.
- :meth:`FaultProxy.half_open`: open connections go silent for good (the peer vanished without
  a FIN or RST) and new ones are accepted but never answered, until :meth:`heal`. Silent
  connections stay silent after that: only the node can notice and drop them.
- :meth:`FaultProxy.delay`: every chunk waits ``latency`` plus a uniform ``jitter`` (order kept
  within each direction), until :meth:`heal`.

Only the standard library is used; every wait is bounded, and :meth:`FaultProxy.close` closes
everything it opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["CONNECTION_KINDS", "FaultProxy", "classify"]

CONNECTION_KINDS = frozenset({"subscriber", "command"})

# Commands redis-py sends while setting a connection up, before the caller's first command.
_HANDSHAKE = frozenset({b"HELLO", b"AUTH", b"CLIENT", b"SELECT", b"READONLY"})
_SUBSCRIBE = frozenset({b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE"})
# Unclassified past this many bytes: not a client we know; treat it as a command connection.
_SNIFF_LIMIT = 64 * 1024
_CHUNK = 64 * 1024
# Redis on loopback accepts in microseconds; a stopped server refuses at once.
_UPSTREAM_CONNECT_TIMEOUT = 2.0
# A peer that does not read what we write for this long is as good as gone.
_DRAIN_TIMEOUT = 10.0


def _parse_command(buffer: bytes, start: int) -> tuple[list[bytes], int] | None:
    """Parse one command (a RESP array of bulk strings, or an inline command) at ``start``.

    Returns its arguments and the offset after it, or None if more bytes are needed.
    Raises ValueError on bytes that are not a command."""
    if start >= len(buffer):
        return None
    end = buffer.find(b"\r\n", start)
    if end < 0:
        return None
    if buffer[start : start + 1] != b"*":
        return buffer[start:end].split(), end + 2
    count = int(buffer[start + 1 : end])
    position = end + 2
    args: list[bytes] = []
    for _ in range(count):
        end = buffer.find(b"\r\n", position)
        if end < 0:
            return None
        if buffer[position : position + 1] != b"$":
            raise ValueError(f"expected a bulk string at offset {position}")
        length = int(buffer[position + 1 : end])
        data_start = end + 2
        if data_start + length + 2 > len(buffer):
            return None
        args.append(buffer[data_start : data_start + length])
        position = data_start + length + 2
    return args, position


def classify(buffer: bytes) -> tuple[str | None, int]:
    """Classify a connection from the first bytes its client sent.

    Returns ``(kind, offset)``: the kind (``"subscriber"`` or ``"command"``; None while only
    handshake commands have come, complete or not) and the offset just after the last complete
    handshake command."""
    position = 0
    while True:
        first = buffer[position : position + 1]
        if first and first != b"*" and not first.isalpha():
            return "command", position  # not RESP (TLS, say): nothing to sniff, forward it
        try:
            parsed = _parse_command(buffer, position)
        except ValueError:
            return "command", position
        if parsed is None:
            return (None, position) if len(buffer) <= _SNIFF_LIMIT else ("command", position)
        args, after = parsed
        name = args[0].upper() if args else b""
        if name in _HANDSHAKE:
            position = after
            continue
        return ("subscriber" if name in _SUBSCRIBE else "command"), position


@dataclass(eq=False)
class _Link:
    """One proxied connection and the tasks that move its bytes."""

    client: asyncio.StreamWriter
    kind: str | None = None
    upstream: asyncio.StreamWriter | None = None
    dead: bool = False  # half-open: silent for good
    closed: bool = False
    to_upstream: asyncio.Queue[tuple[float, bytes | None]] = field(default_factory=asyncio.Queue)
    to_client: asyncio.Queue[tuple[float, bytes | None]] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class ProxyStats:
    accepted: int = 0
    reset: int = 0
    frozen: int = 0
    upstream_failures: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream_host:upstream_port``, with faults."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.stats = ProxyStats()
        self._server: asyncio.base_events.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reset: set[str] = set()
        self._held: set[str] = set()
        self._half_open = False
        self._refuse_all = False
        self._latency = 0.0
        self._jitter = 0.0
        self._rng = random.Random(0)
        self._healed = asyncio.Event()
        self._healed.set()

    @property
    def port(self) -> int:
        assert self._server is not None, "the proxy is not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=_CHUNK)
        return self

    async def close(self) -> None:
        """Stop listening and close every connection (bounded; never raises)."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._close(link, reset=False)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._links.clear()

    # ---- faults ----------------------------------------------------------------------------

    def cut(self, kinds: Iterable[str] = CONNECTION_KINDS, mode: str = "reset") -> None:
        """Cut the connections of ``kinds``: ``reset`` them, or ``drop`` their traffic."""
        kinds = set(kinds)
        if not kinds or kinds - CONNECTION_KINDS or mode not in ("reset", "drop"):
            raise ValueError(f"bad cut: kinds {sorted(kinds)}, mode {mode!r}")
        if mode == "reset":
            self._reset |= kinds
            for link in list(self._links):
                if self._is_reset(link):
                    self._close(link, reset=True)
        else:
            self._held |= kinds
            self._healed.clear()

    def refuse_all(self) -> None:
        """Reset every connection, and every new one at once, whatever its kind."""
        self._refuse_all = True
        for link in list(self._links):
            self._close(link, reset=True)

    def half_open(self) -> None:
        """Open connections go silent for good; new ones are accepted and never answered."""
        self._half_open = True
        for link in self._links:
            if not link.dead:
                link.dead = True
                self.stats.frozen += 1

    def delay(self, latency: float, jitter: float, rng: random.Random | None = None) -> None:
        """Delay every chunk, both ways, by ``latency + uniform(0, jitter)`` seconds."""
        self._latency, self._jitter = latency, jitter
        if rng is not None:
            self._rng = rng

    def heal(self) -> None:
        """End every fault (connections made silent by :meth:`half_open` stay silent)."""
        self._reset.clear()
        self._held.clear()
        self._half_open = False
        self._refuse_all = False
        self._latency = self._jitter = 0.0
        self._healed.set()

    def open_connections(self) -> dict[str, int]:
        """Open connections by kind (``"unknown"``: not classified yet; ``"silent"``)."""
        counts: dict[str, int] = {}
        for link in self._links:
            key = "silent" if link.dead else (link.kind or "unknown")
            counts[key] = counts.get(key, 0) + 1
        return counts

    def _is_reset(self, link: _Link) -> bool:
        if self._refuse_all:
            return True
        if link.kind is None:
            return self._reset >= CONNECTION_KINDS
        return link.kind in self._reset

    def _is_held(self, link: _Link) -> bool:
        if link.kind is None:
            return self._held >= CONNECTION_KINDS
        return link.kind in self._held

    # ---- connections -----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self.stats.accepted += 1
        self._links.add(link)
        try:
            if self._is_reset(link):
                self._close(link, reset=True)
                return
            if self._half_open:
                link.dead = True
                self.stats.frozen += 1
            await self._read_client(link, reader)
        except (OSError, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            self._close(link, reset=False)

    async def _read_client(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Client to server: sniff the kind, then forward chunks until the client closes."""
        loop = asyncio.get_running_loop()
        buffer = b""
        while True:
            chunk = await reader.read(_CHUNK)
            if not chunk:
                return  # the client closed: so does the link
            if link.dead or link.closed:
                continue  # accepted, never answered: swallow, wait for the client to give up
            if link.kind is None:
                buffer += chunk
                kind, offset = classify(buffer)
                chunk, buffer = buffer[:offset], buffer[offset:]
                if kind is not None:
                    link.kind = kind
                    self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
                    if self._is_reset(link):
                        self._close(link, reset=True)
                        return
                    chunk, buffer = chunk + buffer, b""
                if not chunk:
                    continue
                if link.upstream is None and not await self._connect(link):
                    return
            link.to_upstream.put_nowait((self._due(loop), chunk))

    def _due(self, loop: asyncio.AbstractEventLoop) -> float:
        if not (self._latency or self._jitter):
            return 0.0
        return loop.time() + self._latency + self._rng.uniform(0, self._jitter)

    async def _connect(self, link: _Link) -> bool:
        try:
            upstream_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(self.upstream_host, self.upstream_port, limit=_CHUNK),
                _UPSTREAM_CONNECT_TIMEOUT,
            )
        except (OSError, asyncio.TimeoutError):
            self.stats.upstream_failures += 1
            self._close(link, reset=True)
            return False
        if link.closed:
            upstream.close()
            return False
        link.upstream = upstream
        for coroutine in (
            self._write(link, link.to_upstream, upstream),
            self._read_upstream(link, upstream_reader),
            self._write(link, link.to_client, link.client),
        ):
            task = asyncio.create_task(coroutine)
            link.tasks.append(task)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _read_upstream(self, link: _Link, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    break
                link.to_client.put_nowait((self._due(loop), chunk))
        except (OSError, ConnectionError):
            pass
        # Redis closed the connection (stopped, restarted): pass the close on, in order after
        # the bytes before it, unless the link is silent (then the client never hears).
        link.to_client.put_nowait((self._due(loop), None))

    async def _write(
        self,
        link: _Link,
        queue: asyncio.Queue[tuple[float, bytes | None]],
        target: asyncio.StreamWriter,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                while self._is_held(link) and not link.dead:
                    await self._healed.wait()
                if link.dead:
                    continue
                if data is None:
                    break
                target.write(data)
                await asyncio.wait_for(target.drain(), _DRAIN_TIMEOUT)
        except (OSError, ConnectionError, asyncio.TimeoutError):
            pass
        self._close(link, reset=False)

    def _close(self, link: _Link, *, reset: bool) -> None:
        """Close both sides of ``link``; ``reset`` sends the client an RST."""
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        if reset:
            self.stats.reset += 1
            sock = link.client.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for writer in (link.client, link.upstream):
            if writer is None:
                continue
            with contextlib.suppress(Exception):
                if reset:
                    writer.transport.abort()
                else:
                    writer.close()
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
