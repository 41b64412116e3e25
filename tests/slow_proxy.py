"""A loopback TCP proxy that holds each answer of the server behind it for ``delay_s`` seconds: a server
that is there and does its work, but answers slowly (requests reach it at once)."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlparse


class DelayingProxy:
    def __init__(self, upstream_uri: str) -> None:
        target = urlparse(upstream_uri)
        self.upstream = (target.hostname, target.port)
        self.delay_s = 0.0
        self.held = 0  # answers being held now
        self.lock = threading.Condition()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = False

    def __enter__(self) -> "DelayingProxy":
        threading.Thread(target=self.accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.closed = True
        self.listener.close()

    def accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self.pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, True), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if answers and self.delay_s:
                    with self.lock:
                        self.held += 1
                    try:
                        time.sleep(self.delay_s)
                    finally:
                        with self.lock:
                            self.held -= 1
                            self.lock.notify_all()
                sink.sendall(chunk)
        except OSError:  # the other side went away (a client that timed out)
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def wait_for_answers(self, timeout_s: float = 60) -> None:
        """Until no answer is held: every request sent so far has been answered (or its client is gone)."""
        with self.lock:
            assert self.lock.wait_for(lambda: self.held == 0, timeout_s), f"{self.held} answers still held"
