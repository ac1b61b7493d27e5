"""``python -m torpor_operator``: run the operator with settings from ``TORPOR_*``.

Standalone (one replica, no coordination) unless ``TORPOR_PEERING`` names a kopf peering
object (whose CRDs the chart installs) for several replicas: then each replica runs with a
priority (``TORPOR_PEERING_PRIORITY``, or drawn at start-up so that the earliest-started
replica leads) and only the highest-priority live one acts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import socket
import sys
import time

import kopf
from prometheus_client import start_http_server

from torpor_operator import handlers  # noqa: F401 - registers the handlers with kopf
from torpor_operator.metrics import Metrics
from torpor_operator.settings import OperatorSettings, SettingsError, start_up_priority

log = logging.getLogger("torpor.main")


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
    # kopf's identity in the peering records (kopf reads POD_ID too); known here, the shell can
    # tell from the records whether kopf has paused this replica
    identity = os.environ.get("POD_ID") or f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
    if settings.peering:
        drawn = settings.peering_priority is None
        if drawn:
            priority = start_up_priority(time.time_ns(), secrets.randbelow(1000))
            settings = dataclasses.replace(settings, peering_priority=priority)
        log.info("peering %r (%s) as %s with priority %d (%s) and a lifetime of %d s; acting only while no "
                 "live replica has a higher or equal priority", settings.peering,
                 "namespaced" if settings.namespaces else "cluster-wide", identity, settings.peering_priority,
                 "drawn at start-up: the earliest-started replica leads" if drawn else "TORPOR_PEERING_PRIORITY",
                 settings.peering_lifetime_seconds)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    memo = kopf.Memo(settings=settings, metrics=Metrics(), identity=identity)
    asyncio.run(kopf.operator(
        standalone=not settings.peering,
        peering_name=settings.peering or None,
        priority=settings.peering_priority,
        identity=identity,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
        memo=memo,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
