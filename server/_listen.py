"""The listening socket, bound before B loads so that a port in use is one clear line."""

from __future__ import annotations

import errno
import socket

from splitexport import SplitExportError


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` as uvicorn binds one (IPv6 for a host with ':'), or a one-line error."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OverflowError as exc:  # SPLITEXPORT_PORT from the environment skips the --port check
        sock.close()
        raise SplitExportError(f"cannot listen on port {port}: a TCP port is 1..65535") from exc
    except OSError as exc:  # in use, not an address of this machine, or an unknown host name
        sock.close()
        fix = "choose another --port" if exc.errno == errno.EADDRINUSE else "check --host"
        raise SplitExportError(f"cannot listen on {host}:{port}: {exc.strerror}; {fix}") from exc
    return sock
