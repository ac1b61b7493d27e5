"""Fixtures for the operator tests: the CRDs applied once per session, the operator process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import ControlPlane
from operator_process import OperatorProcess

CRD = Path(__file__).resolve().parents[2] / "crds" / "trainingjobs.yaml"
PEERING_CRDS = CRD.with_name("kopfpeerings.yaml")


@pytest.fixture(scope="session")
def trainingjob_crd(control_plane: ControlPlane) -> str:
    """crds/trainingjobs.yaml applied (server-side) and Established; returns the CRD name."""
    applied = control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD), check=False)
    assert applied.returncode == 0, f"the API server refused crds/trainingjobs.yaml: {applied.stderr}"
    name = "trainingjobs.torpor.dev"
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    return name


@pytest.fixture(scope="session")
def peering_crds(control_plane: ControlPlane) -> tuple[str, str]:
    """crds/kopfpeerings.yaml applied (server-side) and Established; returns the two CRD names."""
    applied = control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(PEERING_CRDS),
                                    check=False)
    assert applied.returncode == 0, f"the API server refused crds/kopfpeerings.yaml: {applied.stderr}"
    names = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")
    control_plane.kubectl("wait", "--for=condition=Established", *(f"crd/{n}" for n in names), "--timeout=60s")
    return names


@pytest.fixture
def operator_process(control_plane: ControlPlane, trainingjob_crd: str, namespace: str, s3_bucket: str,
                     tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator watching the test's namespace, with MinIO's credentials (``s3_bucket`` exists)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}
    env.update(KUBECONFIG=str(control_plane.kubeconfig), TORPOR_NAMESPACES=namespace, TORPOR_HEALTH_PORT="0",
               TORPOR_METRICS_PORT="0", TORPOR_LOG_FORMAT="plain", TORPOR_RETENTION_INTERVAL_SECONDS="2",
               TORPOR_BACKOFF_BASE_SECONDS="1")
    op = OperatorProcess(env, tmp_path / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(op.log()[-8000:])  # shown by pytest only when the test failed
