"""A free local TCP port, so tests that start servers or process groups never collide with
another run on the same machine (accelerate's default port 29500 is shared by everyone)."""

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
