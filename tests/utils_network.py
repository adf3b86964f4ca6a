"""A free local TCP port, so tests that start servers or process groups never collide with
another run on the same machine (accelerate's default port 29500 is shared by everyone)."""

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gloo_threads() -> dict[int, str]:
    """This process's running gloo threads (Linux), id -> name: a process group's workers and its TCP loop."""
    import os

    threads = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                name = comm.read().strip()
        except FileNotFoundError:  # the thread ended while we listed
            continue
        if name.startswith(("pt_gloo", "gloo_")):
            threads[int(task)] = name
    return threads
