"""Is there a Dask scheduler at ``lcmap predict --scheduler ADDRESS``? Asked in a few seconds, before
Dask connects.

Dask's client trusts the other end: a service that accepts the connection and never answers (a
plain TCP server) kept ``lcmap predict`` waiting over 200 s, and one that answers in its own
protocol had its first 8 bytes taken as a message length (an HTTP server's ``HTTP/1.0``: 3.07 EiB
to allocate). A Dask scheduler speaks first: on accepting a connection it sends its handshake, a
small message of frames (8-byte little-endian length, then a msgpack map naming ``compression``,
``python`` and ``pickle-protocol``). :func:`check_scheduler` connects with a deadline, reads that
message and checks it, then closes the connection (the scheduler logs the short visit at INFO).

``tls://`` addresses are not probed (the TLS handshake comes first); Dask's connect timeout, which
:func:`lcmap.pipeline.prediction.execution.dask_client` sets, bounds them. ``lcmap predict`` asks before it reads
the model and the imagery.
"""

from __future__ import annotations

import socket
import struct
import time

from lcmap.errors import LcmapInputError

__all__ = ["CHECK_TIMEOUT_S", "check_scheduler"]

#: Seconds to connect and receive the scheduler's handshake.
CHECK_TIMEOUT_S = 5.0
#: A Dask handshake is ~100 bytes; anything announcing more than this is not one.
_MAX_HANDSHAKE_BYTES = 1 << 16
_HANDSHAKE_KEYS = (b"compression", b"pickle-protocol")
_HINT = (
    "Check the address and port (a Dask scheduler listens on 8786 by default; 8787 is its dashboard), "
    "start one with 'dask scheduler', or leave --scheduler out to use a local cluster."
)


def check_scheduler(address: str, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Connect to ``address`` (``tcp://host:port`` or ``host:port``) and check that a Dask scheduler
    answers, within ``timeout_s`` in all. Imports nothing heavy (the CLI asks before loading torch).

    Raises:
        LcmapInputError: nothing listens there, the host is unknown, or the service there does not
            send a Dask handshake in time (the message says which, and the usual ports).
    """
    scheme, sep, location = address.partition("://")
    if not sep:
        scheme, location = "tcp", address
    if scheme != "tcp":
        return
    host, port = _host_port(location, address)
    deadline = time.monotonic() + timeout_s
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except socket.gaierror as exc:
        raise LcmapInputError(
            f"--scheduler {address}: cannot connect, unknown host {host!r} ({exc}). {_HINT}"
        ) from None
    except OSError as exc:
        raise LcmapInputError(
            f"--scheduler {address}: cannot connect to a Dask scheduler there ({type(exc).__name__}). {_HINT}"
        ) from None
    with sock:
        header = _read(sock, 8, deadline, address)
        (size,) = struct.unpack("<Q", header)
        if not 0 < size <= _MAX_HANDSHAKE_BYTES:
            raise _not_dask(address, f"its first bytes {header!r} are not a Dask message")
        body = _read(sock, size, deadline, address)
        if not all(key in body for key in _HANDSHAKE_KEYS):
            raise _not_dask(address, "its first message is not a Dask handshake")


def _host_port(location: str, address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` (Dask's default port 8786)."""
    if location.startswith("["):
        host, _, rest = location[1:].partition("]")
        port = rest.removeprefix(":")
    elif location.count(":") == 1:
        host, _, port = location.partition(":")
    else:
        host, port = location, ""
    try:
        number = int(port) if port else 8786
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise LcmapInputError(f"--scheduler {address}: not a Dask scheduler address (tcp://HOST:PORT). {_HINT}")
    return host, number


def _read(sock: socket.socket, n: int, deadline: float, address: str) -> bytes:
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _not_dask(address, "it accepted the connection but sent nothing a Dask scheduler sends, in time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError:
            continue  # the deadline check above reports it
        except OSError as exc:
            raise _not_dask(address, f"the connection failed ({type(exc).__name__})") from None
        if not chunk:
            raise _not_dask(address, "it closed the connection without a Dask handshake")
        data += chunk
    return data


def _not_dask(address: str, why: str) -> LcmapInputError:
    return LcmapInputError(f"--scheduler {address}: the service there is not a Dask scheduler ({why}). {_HINT}")
