"""``python -m torpor_operator``: run the operator with settings from ``TORPOR_*``.

Standalone (one replica, no coordination) unless ``TORPOR_PEERING`` names a kopf peering
object (whose CRDs the chart installs) for several replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import kopf
from prometheus_client import start_http_server

from torpor_operator import handlers  # noqa: F401 - registers the handlers with kopf
from torpor_operator.metrics import Metrics
from torpor_operator.settings import OperatorSettings, SettingsError


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and the environment, then run until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m torpor_operator", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="log kopf's debug messages")
    args = parser.parse_args(argv)
    try:
        settings = OperatorSettings.from_env(os.environ)
    except SettingsError as exc:
        print(f"torpor-operator: {exc}", file=sys.stderr)
        return 2
    kopf.configure(verbose=args.verbose,
                   log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.PLAIN)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    memo = kopf.Memo(settings=settings, metrics=Metrics())
    asyncio.run(kopf.operator(
        standalone=not settings.peering,
        peering_name=settings.peering or None,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
        memo=memo,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
