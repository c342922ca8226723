"""A TCP proxy on the loopback interface that can cut its connections, for outage tests.

Put between a worker and PostgreSQL, it simulates the database going away without touching
the machine's server, which other tests and people use: ``cut()`` drops every connection
and refuses new ones, as an unreachable server does, until ``restore()``. ``hold()`` keeps
the connections open but lets nothing through any more, as a network that loses packets.
"""

from __future__ import annotations

import socket
import threading

LOOPBACK = '127.0.0.1'


class Proxy:
    """Forwards connections on ``port`` to ``target``, a thread per direction, bounded."""

    MAX_CONNECTIONS = 32

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepting = threading.Event()
        self._holding = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._listen()

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self._accepting.clear()
        if self._acceptor is not None:
            self._acceptor.join(5)
        if self._listener is not None:
            self._listener.close()  # connecting now gets "connection refused"
            self._listener = None
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            _shut(sock)  # wakes its pump threads, which close it

    def hold(self) -> None:
        """Let nothing through from now on (what arrives is dropped), until ``cut()``."""
        self._holding.set()

    def restore(self) -> None:
        """Accept connections again, on the same port, and let everything through."""
        self._holding.clear()
        self._listen()

    def close(self) -> None:
        self.cut()

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(16)
        listener.settimeout(0.1)  # to see a cut() between connections
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accepting.set()
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._accepting.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                full = len(self._sockets) >= 2 * self.MAX_CONNECTIONS
            if full:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets.update((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self._holding.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.difference_update((source, sink))
            for sock in (source, sink):
                _shut(sock)
                sock.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
