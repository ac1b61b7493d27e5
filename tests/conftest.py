"""Session fixtures for real parts: MinIO, the local control plane and the node agent.

Each is started lazily, at most once per session, only by the tests that ask for it, and
torn down at the end even when tests fail. A server that cannot start fails the tests
that need it; nothing is skipped.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import ControlPlane
from processes import poll
from s3server import MinioServer


@pytest.fixture(scope="session")
def minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """A MinIO server on a free loopback port with generated credentials."""
    with MinioServer(tmp_path_factory.mktemp("minio")) as server:
        yield server


@pytest.fixture
def s3_bucket(minio: MinioServer, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh bucket; the test's ``os.environ`` points boto3 at MinIO."""
    import boto3

    for key, value in minio.env().items():
        monkeypatch.setenv(key, value)
    name = _dns_name(request.node.name, limit=40) + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback."""
    with ControlPlane(tmp_path_factory.mktemp("control-plane")) as cp:
        yield cp


@pytest.fixture(scope="session")
def node_agent(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory):
    """Two Ready nodes whose pods run as local processes (ConfigMap sync every 3 s)."""
    from node_agent import NodeAgent

    agent = NodeAgent(control_plane.kubeconfig, tmp_path_factory.mktemp("node-agent"),
                      nodes=2, configmap_sync_seconds=3.0)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane):
    """A ``kubernetes.client.ApiClient`` with the admin credentials."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    assert isinstance(api, client.ApiClient)
    yield api
    api.close()


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of its own for one test, deleted afterwards."""
    name = _dns_name(request.node.name, limit=50) + "-" + uuid.uuid4().hex[:6]
    control_plane.kubectl("create", "namespace", name)
    # The ServiceAccount admission plugin refuses pods until the controller-manager has made the
    # namespace's `default` ServiceAccount; on a loaded machine that takes a moment.
    poll(lambda: control_plane.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
         timeout=60, what=f"the default ServiceAccount of namespace {name}")
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _dns_name(text: str, limit: int) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return name or "t"


def pytest_report_header(config: pytest.Config) -> str:
    return f"torpor cache: {os.environ.get('TORPOR_CACHE', str(Path.home() / '.cache/torpor'))}"
