"""A TCP proxy in front of localstripe that the tests switch: up (forwarding), down (every connection
closed at once: Stripe unreachable), or losing the next answer (the next request reaches Stripe and
is acted on, its answer never comes back, then the proxy is down). localstripe keeps its state
throughout, which stopping it would not."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

UP, DOWN, LOSE_NEXT_ANSWER = "up", "down", "lose-next-answer"


class StripeProxy:
    def __init__(self, upstream_base: str):
        parts = urlsplit(upstream_base)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.mode = UP
        self.requests_lost = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="stripe-proxy", daemon=True).start()

    # ---- switching
    def up(self) -> None:
        self.mode = UP

    def down(self) -> None:
        self.mode = DOWN
        self._close_all()

    def lose_next_answer(self) -> None:
        self.mode = LOSE_NEXT_ANSWER
        self._close_all()  # the next request opens a new connection, which is the one that loses its answer

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self._close_all()

    # ---- plumbing
    def _close_all(self) -> None:
        with self._lock:
            sockets, self._open = list(self._open), set()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._open.add(s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                if mode == LOSE_NEXT_ANSWER:
                    self.mode = DOWN  # only this one connection gets through
            if mode == DOWN:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            self._track(client)
            self._track(upstream)
            lose = mode == LOSE_NEXT_ANSWER
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, lose), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, lose: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if lose:  # Stripe answered: the answer is lost, the caller's connection drops
                    self.requests_lost += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
