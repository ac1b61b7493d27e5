"""Fixtures for the operator tests: the TrainingJob CRD applied once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane import ControlPlane

CRD = Path(__file__).resolve().parents[2] / "crds" / "trainingjobs.yaml"


@pytest.fixture(scope="session")
def trainingjob_crd(control_plane: ControlPlane) -> str:
    """crds/trainingjobs.yaml applied (server-side) and Established; returns the CRD name."""
    applied = control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD), check=False)
    assert applied.returncode == 0, f"the API server refused crds/trainingjobs.yaml: {applied.stderr}"
    name = "trainingjobs.torpor.dev"
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    return name
