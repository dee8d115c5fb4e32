"""free_port: a TCP port that is free on 127.0.0.1 right now (rendezvous ports, local servers, test clusters)."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
