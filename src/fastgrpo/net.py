"""Network helpers shared by the trainer, the client and the server (none imports another's package)."""

import socket


def free_port() -> int:
    """A port free on every interface (a TCPStore master binds them all)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
