"""A TCP proxy that injects network faults between Celery processes and a service.

    with FaultProxy("127.0.0.1", 5672) as proxy:         # RabbitMQ (or 6379: Redis)
        url = proxy.rewrite("amqp://guest:guest@127.0.0.1:5672/vhost")
        ...                                             # point workers / clients at ``url``
        proxy.freeze()     # the service "stops answering": sockets stay open, no byte moves
        proxy.forward()    # ... and answers again, nothing lost
        proxy.cut()        # every connection through it is closed; new ones are closed at once

Owns: FaultProxy only. The tests use it to freeze or cut RabbitMQ or Redis in the middle of a
run, the way a paused VM or a network partition does (a frozen peer is worse than a dead one:
nothing tells the client, only its own timeouts can). Each connection gets its own upstream
connection; one thread moves the bytes of all of them.
"""
import selectors
import socket
import threading
from urllib.parse import urlparse

__all__ = ["FaultProxy"]


class FaultProxy:
    """Listen on 127.0.0.1:<free port>, relay each connection to ``host:port``."""

    def __init__(self, host, port, listen_host="127.0.0.1"):
        self.target = (host, port)
        self.listener = socket.create_server((listen_host, 0))
        self.listener.setblocking(False)
        self.host, self.port = self.listener.getsockname()[:2]
        self.mode = "forward"
        self.pairs = []            # [client socket, upstream socket] per connection
        self.accepted = 0          # connections seen, for tests that check who connected
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"FaultProxy:{port}", daemon=True)

    # --- commands -------------------------------------------------------------------------
    def forward(self):
        """Relay bytes both ways (the normal state; also ends a freeze, delivering what waited)."""
        self.mode = "forward"

    def freeze(self):
        """Move no byte in either direction but keep every socket open: a peer that hangs.

        Bytes already sent wait in the kernel's buffers; new connections are accepted (the
        kernel completes the handshake) but get no answer either.
        """
        self.mode = "freeze"

    def cut(self):
        """Close every connection now, and each new one as soon as it arrives."""
        self.mode = "cut"
        with self._lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            _close(*pair)

    def rewrite(self, url):
        """``url`` with its host:port replaced by the proxy's (user, password, path kept)."""
        parsed = urlparse(url)
        auth = parsed.netloc.rpartition("@")[0]
        return parsed._replace(netloc=f"{auth + '@' if auth else ''}{self.host}:{self.port}").geturl()

    # --- context manager ------------------------------------------------------------------
    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.cut()
        self.listener.close()

    # --- the relay loop -------------------------------------------------------------------
    def _run(self):
        while not self._stop.is_set():
            with selectors.DefaultSelector() as selector:
                selector.register(self.listener, selectors.EVENT_READ)
                with self._lock:
                    pairs = list(self.pairs)
                if self.mode == "forward":
                    for pair in pairs:
                        for sock in pair:
                            selector.register(sock, selectors.EVENT_READ, pair)
                for key, _ in selector.select(timeout=0.05):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif self.mode == "forward":
                        self._relay(key.fileobj, key.data)

    def _accept(self):
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        self.accepted += 1
        if self.mode == "cut":
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=3)
        except OSError:
            client.close()  # the service itself is down: the client sees a closed connection
            return
        for sock in (client, upstream):
            sock.setblocking(True)
            sock.settimeout(5)  # a sendall to a live peer never takes this long
        with self._lock:
            self.pairs.append([client, upstream])

    def _relay(self, sock, pair):
        other = pair[1] if sock is pair[0] else pair[0]
        try:
            data = sock.recv(65536)
            if data:
                other.sendall(data)
                return
        except OSError:
            pass
        with self._lock:  # one side closed or failed: close both, as a real peer would see it
            if pair in self.pairs:
                self.pairs.remove(pair)
        _close(*pair)


def _close(*sockets):
    for sock in sockets:
        try:
            sock.close()
        except OSError:
            pass
