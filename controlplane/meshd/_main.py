"""The ``meshd`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from libmesh import __version__
from libmesh._duration import seconds_argument

from ._server import Meshd, Settings, StartupError

__all__ = ["main"]

logger = logging.getLogger("meshd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshd",
        description=(
            "The libmesh control plane: serves Istio-style YAML from a directory to libmesh, "
            "grpcio (xds:///) and Envoy over xDS v3 (ADS), and keeps the service registry."
        ),
    )
    parser.add_argument("--version", action="version", version=f"meshd {__version__}")
    parser.add_argument(
        "--config-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="the directory of YAML files to serve (read recursively, watched for changes)",
    )
    parser.add_argument(
        "--xds-address",
        default="127.0.0.1:15010",
        metavar="HOST:PORT",
        help="where to serve xDS over plaintext gRPC (default: 127.0.0.1:15010; port 0 picks one)",
    )
    parser.add_argument(
        "--admin-address",
        default="127.0.0.1:15014",
        metavar="HOST:PORT",
        help="where to serve /metrics, /ready and /debug/* (default: 127.0.0.1:15014)",
    )
    parser.add_argument(
        "--registration-grace",
        default=10.0,
        type=seconds_argument,
        metavar="DURATION",
        help="how long a self-registered workload stays an endpoint after it disconnects "
        "(default: 10s)",
    )
    parser.add_argument(
        "--debounce",
        default=0.1,
        type=seconds_argument,
        metavar="DURATION",
        help="how long to wait for more changes before pushing (default: 100ms)",
    )
    parser.add_argument(
        "--ca-dir",
        type=Path,
        default=_default_ca_dir(),
        metavar="DIR",
        help="where the certificate authority keeps its root, its key (mode 0600) and the "
        "token key; made on first start (default: %(default)s)",
    )
    parser.add_argument(
        "--secure-xds-address",
        default="127.0.0.1:15012",
        metavar="HOST:PORT",
        help="where to serve xDS and the CA over TLS with meshd's own certificate; a client "
        "presenting its SVID renews it there without a token (default: 127.0.0.1:15012; "
        "'' turns it off)",
    )
    parser.add_argument(
        "--trust-domain",
        default="cluster.local",
        help="the SPIFFE trust domain of the identities the CA signs (default: cluster.local)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    return parser


def _default_ca_dir() -> Path:
    """``$MESHD_CA_DIR``, else ``$XDG_DATA_HOME/meshd/ca`` (``~/.local/share/meshd/ca``)."""
    explicit = os.environ.get("MESHD_CA_DIR")
    if explicit:
        return Path(explicit)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "meshd" / "ca"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    settings = Settings(
        config_dir=args.config_dir,
        xds_address=args.xds_address,
        admin_address=args.admin_address,
        registration_grace=args.registration_grace,
        debounce=args.debounce,
        ca_dir=args.ca_dir,
        trust_domain=args.trust_domain,
        secure_xds_address=args.secure_xds_address or None,
    )
    try:
        return asyncio.run(_run(settings))
    except StartupError as exc:
        logger.error("meshd: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(settings: Settings) -> int:
    meshd = Meshd(settings)
    await meshd.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    result = meshd.config
    assert result is not None
    xds_host = settings.xds_address.rpartition(":")[0]
    admin_host = settings.admin_address.rpartition(":")[0]
    logger.info(
        "meshd %s is serving %d resources from %s\n"
        "  xDS (ADS over gRPC)  %s:%d\n"
        "  admin (HTTP)         http://%s:%d/  (metrics, ready, debug/syncz, debug/configz)\n"
        "  CA                   %s (trust domain %s; CreateCertificate on the xDS address)\n"
        "  xDS + CA over TLS    %s",
        __version__,
        len(result.config),
        settings.config_dir,
        xds_host,
        meshd.xds_port,
        admin_host,
        meshd.admin_port,
        settings.ca_dir,
        settings.trust_domain,
        f"{settings.secure_xds_address.rpartition(':')[0]}:{meshd.secure_xds_port}"
        if settings.secure_xds_address
        else "off",
    )
    await stop.wait()
    logger.info("meshd: stopping")
    await meshd.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
