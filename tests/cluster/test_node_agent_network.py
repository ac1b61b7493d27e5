"""Pod networking on the node agent: an address per pod, wildcard binds kept on it, and two
PyTorch jobs whose rank-0 processes both use MASTER_PORT 29500 at the same time.
"""

from __future__ import annotations

import socket

import pytest
from test_node_agent import apply, container_pid, eventually, get_json, python_pod, wait_log, wait_running

from controlplane import ControlPlane
from node_agent import NodeAgent
from processes import listening_addresses

pytestmark = pytest.mark.cluster

WILDCARD_SERVER = """\
    import socket, time
    v4 = socket.create_server(("", 29500))
    dual = socket.create_server(("::", 29501), family=socket.AF_INET6, dualstack_ipv6=True)
    print("listening", v4.getsockname(), dual.getsockname(), flush=True)
    while True:
        conn, _ = v4.accept()
        conn.sendall(socket.gethostname().encode())
        conn.close()
"""


def test_wildcard_binds_stay_on_each_pods_own_address(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    pods = [python_pod(f"server-{i}", WILDCARD_SERVER, terminationGracePeriodSeconds=1) for i in range(2)]
    apply(control_plane, namespace, *pods)
    running = [wait_running(control_plane, namespace, f"server-{i}") for i in range(2)]
    for pod in running:
        wait_log(node_agent, pod, "listening")
        ip = pod["status"]["podIP"]
        # Both pods listen on the same ports, each on its own pod IP and nowhere else.
        assert listening_addresses({container_pid(pod)}) == {(ip, 29500), (f"::ffff:{ip}", 29501)}
        with socket.create_connection((ip, 29500), timeout=10) as conn:
            assert conn.recv(100).decode() == pod["metadata"]["name"]


TRAIN = """\
    import os
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    print("all_reduce", value.item(), "world", dist.get_world_size(), flush=True)
    dist.destroy_process_group()
"""


def test_two_torch_jobs_share_master_port_29500(control_plane: ControlPlane, node_agent: NodeAgent, namespace: str):
    pods = []
    for job in ("job-a", "job-b"):
        apply(
            control_plane,
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": job},
                "spec": {"clusterIP": "None", "selector": {"job": job}},
            },
        )
        for rank in range(2):
            env = {"MASTER_ADDR": f"rank-0.{job}", "MASTER_PORT": "29500", "RANK": str(rank), "WORLD_SIZE": "2"}
            pods.append(
                python_pod(
                    f"{job}-{rank}",
                    TRAIN,
                    metadata={"labels": {"job": job}},
                    hostname=f"rank-{rank}",
                    subdomain=job,
                    container={"env": [{"name": k, "value": v} for k, v in env.items()]},
                )
            )
    apply(control_plane, namespace, *pods)
    for pod in pods:
        name = pod["metadata"]["name"]
        done = eventually(
            lambda n=name: (
                (p := get_json(control_plane, "pod", n, "-n", namespace))
                and p["status"].get("phase") in ("Succeeded", "Failed")
                and p
            ),
            180,
            f"{name} finished",
        )
        log = node_agent.logs_path(done).read_text()
        assert done["status"]["phase"] == "Succeeded", log
        assert "all_reduce 3.0 world 2" in log


RESOLVER = """\
    import socket, time
    while True:  # what a rank waiting for its peers does: resolve the name until it exists
        try:
            print("resolved", socket.gethostbyname("{peer}"), flush=True)
            break
        except OSError:
            time.sleep(0.1)
    while True:  # then until the peer is gone
        try:
            socket.gethostbyname("{peer}")
            time.sleep(0.1)
        except OSError:
            print("gone", flush=True)
            break
    time.sleep(3600)
"""


def test_a_pod_resolves_a_peer_that_starts_after_it_and_stops_resolving_it_once_it_ends(
    control_plane: ControlPlane, node_agent: NodeAgent, namespace: str
):
    peer = f"b.s.{namespace}.svc.cluster.local"
    first = python_pod("a", RESOLVER.format(peer=peer), hostname="a", subdomain="s", terminationGracePeriodSeconds=1)
    apply(control_plane, namespace, first)
    waiting = wait_running(control_plane, namespace, "a")
    second = python_pod("b", "import time; time.sleep(3600)", hostname="b", subdomain="s",
                        terminationGracePeriodSeconds=1)
    apply(control_plane, namespace, second)
    ip = wait_running(control_plane, namespace, "b")["status"]["podIP"]
    assert f"resolved {ip}" in wait_log(node_agent, waiting, "resolved")
    control_plane.kubectl("delete", "pod", "b", "-n", namespace, "--wait=false")
    wait_log(node_agent, waiting, "gone")
