"""A small client of the policy server (``rvla-serve``), standard library and numpy only::

    from rvla_peft.serving.client import PolicyClient

    client = PolicyClient("http://127.0.0.1:8000")
    action = client.act(image, "push the cube to the goal")  # numpy [A], or [k, A] for a chunking policy

One connection, kept alive between requests: use one client per thread.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse

import numpy as np

from rvla_peft.serving import json_numpy


class PolicyServerError(RuntimeError):
    """The server answered with an error: ``status`` and its one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status, self.reason = status, reason


class PolicyClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 60.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must look like http://HOST:PORT, got {url!r}")
        self._connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._address = (parts.hostname, parts.port)
        self._prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """``(status, body bytes)`` of one request; the connection is reopened once if the server had closed it."""
        headers = {**self._headers, **(headers or {})}
        for attempt in (0, 1):
            try:
                if self._connection is None:
                    self._connection = self._connection_class(*self._address, timeout=self.timeout)
                    self._connection.connect()
                    # headers and body leave in two writes: without this the body could wait for a delayed ACK
                    self._connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._connection.request(method, self._prefix + path, body=body, headers=headers)
                response = self._connection.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
                continue
            if response.will_close:
                self.close()
            return response.status, data
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, payload: dict | None = None) -> dict:
        body = None if payload is None else json_numpy.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        status, data = self.request(method, path, body, headers)
        if status >= 400:
            try:
                reason = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                reason = data[:200].decode(errors="replace")
            raise PolicyServerError(status, reason)
        return json_numpy.loads(data)

    def health(self) -> dict:
        return self._json("GET", "/health")

    def metadata(self) -> dict:
        return self._json("GET", "/metadata")

    def act_reply(
        self, image, instruction: str, *, unnorm_key: str | None = None, state: np.ndarray | None = None
    ) -> dict:
        """The whole reply: ``{"action": numpy array, "server_timing": {...}}``."""
        payload = {"image": np.asarray(image), "instruction": instruction}
        if unnorm_key is not None:
            payload["unnorm_key"] = unnorm_key
        if state is not None:
            payload["state"] = np.asarray(state, dtype=np.float32)
        return self._json("POST", "/act", payload)

    def act(self, image, instruction: str, *, unnorm_key: str | None = None, state: np.ndarray | None = None):
        """The action for one camera image (uint8 [H, W, 3], numpy or PIL) and instruction."""
        return self.act_reply(image, instruction, unnorm_key=unnorm_key, state=state)["action"]
