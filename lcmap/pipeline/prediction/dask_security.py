"""How ``lcmap predict --scheduler ADDRESS`` connects to a Dask scheduler: TLS from Dask's own config.

Plain ``tcp://`` Dask has no encryption and no authentication: anyone who can reach the scheduler's
port can submit code to its workers. For a scheduler on another machine use ``tls://host:8786``;
the client certificate, its key and the CA that signed the cluster's certificates come from Dask's
configuration (YAML in ``~/.config/dask/*.yaml`` or environment variables)::

    export DASK_DISTRIBUTED__COMM__TLS__CA_FILE=ca.pem
    export DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT=client.pem   # may hold the key too
    export DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY=client-key.pem
    export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True

(the scheduler and workers are started with ``--tls-ca-file --tls-cert --tls-key``). A worker then
trusts what the client sends it: the checkpoint and imagery paths of the job, which it opens itself
(they must be readable by every worker), and the checkpoint is read weights-only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Any

from lcmap.errors import LcmapInputError

log = logging.getLogger(__name__)

__all__ = ["TLS_ENV", "scheduler_security"]

#: Dask config key -> the environment variable that sets it.
TLS_ENV = {
    "distributed.comm.tls.ca-file": "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
    "distributed.comm.tls.client.cert": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
    "distributed.comm.tls.client.key": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY",
}


def scheduler_security(address: str) -> Any:
    """The ``distributed.Security`` to connect to ``address`` with (None: Dask's default).

    ``tls://``: a Security built from Dask's config (``distributed.comm.tls.*``), after checking that
    the CA file and client certificate are set and readable. ``tcp://`` (or no scheme) to a host
    other than this machine: a warning that the connection is neither encrypted nor authenticated.

    Raises:
        LcmapInputError: ``tls://`` without a CA file or client certificate configured, or one of
            the configured files cannot be read.
    """
    import dask
    from distributed import Security

    scheme, _, rest = address.partition("://")
    if not rest:
        scheme, rest = "tcp", address
    if scheme == "tls":
        for key in ("distributed.comm.tls.ca-file", "distributed.comm.tls.client.cert"):
            if not dask.config.get(key, None):
                raise LcmapInputError(
                    f"--scheduler {address}: TLS needs the CA file and a client certificate; set {TLS_ENV[key]} "
                    f"(Dask config {key}), and {TLS_ENV['distributed.comm.tls.client.key']} if the key is separate"
                )
        for key, env in TLS_ENV.items():
            path = dask.config.get(key, None)
            if path and not os.access(path, os.R_OK):
                raise LcmapInputError(f"--scheduler {address}: {path} ({env}) does not exist or cannot be read")
        return Security(require_encryption=True)
    if scheme == "tcp" and not _is_local(rest.rsplit(":", 1)[0].strip("[]")):
        log.warning(
            "--scheduler %s: plain TCP is neither encrypted nor authenticated (anyone reaching the port can run "
            "code on the workers); use tls:// (see lcmap.pipeline.prediction.dask_security)",
            address,
        )
    return None


def _is_local(host: str) -> bool:
    """Whether ``host`` is this machine (loopback)."""
    if host in ("", "localhost"):
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False
