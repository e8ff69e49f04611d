"""A TCP proxy that can turn its connections into silent half-open ones (a test fixture).

It listens on ``127.0.0.1`` and forwards each accepted connection to ``target``. After
:meth:`BlackHole.swallow` the chosen connections (every one open then, by default) stay
open on both sides but every byte is read and dropped, in both directions: no reset,
no FIN, no answer. That is what a silent middlebox failure looks like to a client: its
writes succeed, nothing ever comes back. ``swallow(new=True)`` also black-holes the
connections accepted after it (they are never connected upstream).

:meth:`restore` lets new connections through again. Connections already swallowed
stay black-holed until one side closes them: the bytes dropped cannot be undropped,
so resuming them would only corrupt the stream. The realistic case a client must
survive is exactly that: the old connection is dead, a new one works.

One selector thread serves everything. It stops by itself after ``lifetime`` seconds
(closing every socket), and :meth:`stop` (or leaving the ``with`` block) stops it at
once, so a test that forgets it cannot leak a thread or a port.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

__all__ = ["BlackHole"]

_CHUNK = 65536
_TICK = 0.05


@dataclass(eq=False)
class _Pair:
    """One proxied connection: the client's socket and the upstream one (None while a
    connection accepted during ``swallow(new=True)`` is black-holed from the start)."""

    ident: int
    client: socket.socket
    upstream: socket.socket | None
    swallowed: bool = False
    pending: dict[socket.socket, bytearray] = field(default_factory=dict)


class BlackHole:
    """A forwarding proxy to ``127.0.0.1:target_port`` that can go silent."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1",
                 lifetime: float = 60.0) -> None:
        self.target = (target_host, target_port)
        self.lifetime = lifetime
        #: Connections accepted so far (a counter, never decremented).
        self.accepted = 0
        #: Bytes read and dropped from swallowed connections, both directions.
        self.swallowed_bytes = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._pairs: dict[int, _Pair] = {}
        self._lock = threading.Lock()
        self._swallow_new = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blackhole", daemon=True)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> BlackHole:
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every socket and join the thread (idempotent)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def __enter__(self) -> BlackHole:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ---------------------------------------------------------------- switches

    def connections(self) -> list[int]:
        """Ids of the connections open now, oldest first."""
        with self._lock:
            return sorted(self._pairs)

    def live(self) -> list[int]:
        """Ids of the open connections that still forward, oldest first."""
        with self._lock:
            return sorted(i for i, p in self._pairs.items() if not p.swallowed)

    def swallow(self, connections: list[int] | None = None, *, new: bool = False) -> None:
        """Black-hole ``connections`` (every open one when None); with ``new`` also
        every connection accepted from now on, until :meth:`restore`."""
        with self._lock:
            for ident, pair in self._pairs.items():
                if connections is None or ident in connections:
                    pair.swallowed = True
                    pair.pending.clear()
            if new:
                self._swallow_new = True

    def restore(self) -> None:
        """Forward new connections again (swallowed ones stay black-holed)."""
        with self._lock:
            self._swallow_new = False

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        deadline = time.monotonic() + self.lifetime
        try:
            while not self._stopping.is_set() and time.monotonic() < deadline:
                for key, _ in self._selector.select(_TICK):
                    if key.fileobj is self._listener:
                        self._accept()
                    else:
                        self._pump(key.data, key.fileobj)  # type: ignore[arg-type]
                self._flush()
        finally:
            with self._lock:
                pairs = list(self._pairs.values())
                self._pairs.clear()
            for pair in pairs:
                self._close(pair)
            self._selector.unregister(self._listener)
            self._listener.close()
            self._selector.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        with self._lock:
            self.accepted += 1
            ident = self.accepted
            swallowed = self._swallow_new
        upstream = None
        if not swallowed:
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                return
            upstream.setblocking(False)
        pair = _Pair(ident, client, upstream, swallowed=swallowed)
        with self._lock:
            self._pairs[ident] = pair
        self._selector.register(client, selectors.EVENT_READ, pair)
        if upstream is not None:
            self._selector.register(upstream, selectors.EVENT_READ, pair)

    def _pump(self, pair: _Pair, sock: socket.socket) -> None:
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # one side closed: close both, as a plain proxy would
            with self._lock:
                self._pairs.pop(pair.ident, None)
            self._close(pair)
            return
        with self._lock:
            if pair.swallowed:
                self.swallowed_bytes += len(data)
                return
        other = pair.upstream if sock is pair.client else pair.client
        assert other is not None
        pair.pending.setdefault(other, bytearray()).extend(data)
        self._send(pair)

    def _flush(self) -> None:
        """Retry what a full socket buffer left behind."""
        with self._lock:
            pairs = [p for p in self._pairs.values() if p.pending and not p.swallowed]
        for pair in pairs:
            self._send(pair)

    def _send(self, pair: _Pair) -> None:
        with self._lock:
            if pair.swallowed:
                return
            queued = list(pair.pending.items())
        for sock, buffer in queued:
            try:
                sent = sock.send(buffer)
            except BlockingIOError:
                continue
            except OSError:
                sent = len(buffer)
            with self._lock:
                del buffer[:sent]
                if not buffer:
                    pair.pending.pop(sock, None)

    def _close(self, pair: _Pair) -> None:
        for sock in (pair.client, pair.upstream):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
