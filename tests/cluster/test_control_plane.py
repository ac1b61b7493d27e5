"""The local control plane is a real one: versions, health, and nothing off loopback."""

from __future__ import annotations

import json

from bootstrap import KUBERNETES_VERSION
from controlplane import ControlPlane
from processes import descendants, listening_addresses


def test_server_and_kubectl_are_the_pinned_release(control_plane: ControlPlane) -> None:
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == KUBERNETES_VERSION
    assert version["clientVersion"]["gitVersion"] == KUBERNETES_VERSION


def test_every_component_is_healthy(control_plane: ControlPlane) -> None:
    assert all(control_plane.alive().values()), control_plane.alive()
    assert set(control_plane.alive()) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}
    ready = control_plane.kubectl("get", "--raw", "/readyz?verbose").stdout
    assert "readyz check passed" in ready


def test_nothing_listens_beyond_loopback(control_plane: ControlPlane) -> None:
    pids: set[int] = set()
    for pid in control_plane.pids().values():
        pids |= descendants(pid)
    addresses = listening_addresses(pids)
    assert ("127.0.0.1", control_plane.apiserver_port) in addresses
    assert {host for host, _ in addresses} == {"127.0.0.1"}, addresses
