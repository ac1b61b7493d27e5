"""Resize and elastic world size on the real control plane, with real torch ranks (issue 11,
item 3): an elastic job drained to room for 2 of its 3 ranks goes on with 2 from the drain's
checkpoint and grows back to 3 once the node is uncordoned; `kubectl patch tj … replicas`
resizes a running job at one checkpoint, from 3 ranks to 2 and back to 3.

What is asserted is what docs/operator.md's "Resize and elastic" and "Faults" promise. The runs
are kept short: a few hundred steps at 0.05 s, checkpoints every 20 steps, waitSeconds 10.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from torpor.checkpoints import Reason

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not importable by name in one session
    from conftest import Env

pytestmark = pytest.mark.cluster

ARGS = ("--step-delay", "0.05", "--epochs", "500")
#: Each node of the node agent has 8 CPUs: two ranks asking for 3 fit on one node, three do not.
RANK_CPU = "3"


#: The grow's Resizing message (torpor_operator.sizing, row 4), with what it names.
GROW = re.compile(r"running with 2 of 3 ranks since (?P<since>\S+); elastic\.growIntervalSeconds 30s has passed "
                  r"and checkpoint (?P<checkpoint>\S+) \(step (?P<step>\d+)\) is complete: trying all 3 ranks again; "
                  r"asking every rank to save and exit, then restarting with WORLD_SIZE 3")


def parse_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def messages(e2e: Env, reason: str) -> list[dict[str, Any]]:
    """The job's Events of ``reason``, in the order written."""
    return [e for e in e2e.events() if e["reason"] == reason]


def incarnation_pods(e2e: Env, incarnation: int) -> list[dict[str, Any]]:
    return sorted((p for p in e2e.pods() if p["metadata"]["labels"]["torpor.dev/incarnation"] == str(incarnation)),
                  key=lambda p: p["metadata"]["name"])


def world_size(pod: dict[str, Any]) -> str:
    train = next(c for c in pod["spec"]["containers"] if c["name"] == "train")
    return next(e["value"] for e in train["env"] if e["name"] == "WORLD_SIZE")


def steps_of(e2e: Env, rank: int) -> list[int]:
    return [s["step"] for s in e2e.steps() if s["rank"] == rank]


def exit_checkpoint(e2e: Env, name: str, ranks: int) -> Any:
    """The checkpoint ``name``: complete, written by ``ranks`` ranks at one step on their way out."""
    checkpoint = next(c for c in e2e.checkpoints() if c.name == name)
    assert checkpoint.complete and sorted(checkpoint.manifests) == list(range(ranks)), e2e.object_keys()
    manifests = checkpoint.manifests.values()
    assert {m.reason for m in manifests} == {Reason.EXIT} and len({m.save_id for m in manifests}) == 1
    assert {m.world_size for m in manifests} == {ranks}
    return checkpoint


def assert_no_step_lost(e2e: Env, resumed_at: int) -> None:
    """Rank 0 trained in every incarnation: its steps run 1, 2, 3… with none repeated or skipped,
    so every resize resumed at the step it saved; and it has gone on past ``resumed_at``."""
    e2e.wait("steps after the resize", lambda: sum(s > resumed_at + 5 for s in steps_of(e2e, 0)) >= 1)
    seen = steps_of(e2e, 0)
    assert seen == list(range(1, len(seen) + 1)), seen


def assert_trained(e2e: Env, rank: int, *spans: tuple[int, int | None]) -> None:
    """Rank ``rank`` trained exactly the steps of ``spans`` (``(first, last)``, ``last`` None: on
    to its newest step), in that order."""
    e2e.wait(f"rank {rank} trains", lambda: spans[-1][1] is not None or any(
        s >= spans[-1][0] for s in steps_of(e2e, rank)))
    seen = steps_of(e2e, rank)
    expected: list[int] = []
    for first, last in spans:
        expected += list(range(first, (last if last is not None else max(seen)) + 1))
    assert seen == expected, (rank, spans, seen)


def patch_replicas(e2e: Env, replicas: int, incarnation: int) -> dict[str, Any]:
    """``kubectl patch tj mlp`` to ``replicas``: the incarnation that follows runs that many ranks,
    each with that WORLD_SIZE, with no preemption or restart counted. Its status."""
    e2e.kubectl("patch", "tj", "mlp", "--type=merge", "-p", json.dumps({"spec": {"replicas": replicas}}))
    status = e2e.wait_phase("Running", incarnation=incarnation, timeout=180)
    assert (status["worldSize"], status["ready"]) == (replicas, f"{replicas}/{replicas}"), status
    assert (status.get("preemptions", 0), status.get("restarts", 0)) == (0, 0), status
    assert [world_size(p) for p in incarnation_pods(e2e, incarnation)] == [str(replicas)] * replicas
    return status


def test_an_elastic_job_drained_to_room_for_two_ranks_goes_on_with_two_and_grows_back_when_uncordoned(
        e2e: Env) -> None:
    body = e2e.example("--losses", str(e2e.losses()), *ARGS, replicas=3,
                       elastic={"minReplicas": 2, "waitSeconds": 10, "growIntervalSeconds": 30})
    body["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": RANK_CPU,
                                                                                   "memory": "256Mi"}}
    e2e.create(body)
    running = e2e.wait_phase("Running", timeout=150)
    assert (running["worldSize"], running["ready"]) == (3, "3/3"), running
    table = e2e.kubectl("get", "tj").stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "PHASE", "READY", "WORLD-SIZE"], table
    assert table[1].split()[:4] == ["mlp", "Running", "3/3", "3"], table
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)

    node = e2e.node_of("mlp-1-0")
    drained_at = time.monotonic()
    e2e.drain(node)

    # a new incarnation asks for 3 ranks, 2 fit; 10 s later the job restarts on those 2
    short = e2e.wait("the job on 2 ranks", lambda: (st := e2e.status()).get("worldSize") == 2
                     and st.get("incarnation", 0) >= 3 and st, timeout=150)
    print(f"drained -> incarnation {short['incarnation']} with 2 ranks after {time.monotonic() - drained_at:.1f}s")
    short_pods = incarnation_pods(e2e, short["incarnation"])
    assert [world_size(p) for p in short_pods] == ["2", "2"], short_pods
    drained = exit_checkpoint(e2e, short["resumeFrom"], ranks=3)  # the drain's checkpoint, every rank
    assert {m.incarnation for m in drained.manifests.values()} == {"1"}
    e2e.wait_phase("Running", incarnation=short["incarnation"], timeout=120)
    table = e2e.kubectl("get", "tj").stdout.splitlines()
    assert table[1].split()[:4] == ["mlp", "Running", "2/3", "2"], table

    uncordoned_at = time.monotonic()
    e2e.uncordon_all()
    # the grow: growIntervalSeconds after the shrink, right after a periodic checkpoint of the 2 ranks
    grow = e2e.wait("the grow's Resizing", lambda: len(r := messages(e2e, "Resizing")) >= 2 and r[1], timeout=240)
    asked = GROW.fullmatch(grow["message"])
    assert asked is not None, grow["message"]
    assert asked["since"] == short["lastResizeTime"], (asked["since"], short)
    interval_end = parse_time(short["lastResizeTime"]) + timedelta(seconds=30)
    assert parse_time(grow["firstTimestamp"]) >= interval_end, (grow, short["lastResizeTime"])
    print(f"grow asked {(parse_time(grow['firstTimestamp']) - interval_end).total_seconds() + 30:.0f}s after the "
          f"shrink's launch, at checkpoint {asked['checkpoint']} (step {asked['step']})")
    # read now, before retention (keepMax 3) may prune it: the 2 ranks' periodic save that set the grow off
    after = next(c for c in e2e.checkpoints() if c.name == asked["checkpoint"])
    assert after.complete and sorted(after.manifests) == [0, 1], e2e.object_keys()
    assert {(m.reason, m.world_size, m.incarnation, m.step) for m in after.manifests.values()} == {
        (Reason.PERIODIC, 2, str(short["incarnation"]), int(asked["step"]))}
    grown = e2e.wait("all 3 ranks again", lambda: (st := e2e.status()).get("phase") == "Running"
                     and st.get("worldSize") == 3 and st.get("incarnation", 0) > short["incarnation"] and st,
                     timeout=240)
    print(f"uncordoned -> incarnation {grown['incarnation']} with 3 ranks after "
          f"{time.monotonic() - uncordoned_at:.1f}s (growIntervalSeconds 30)")
    assert [world_size(p) for p in incarnation_pods(e2e, grown["incarnation"])] == ["3", "3", "3"]
    # grown at a checkpoint boundary: from the save both ranks made on their way out, past the drain's
    regrown = exit_checkpoint(e2e, grown["resumeFrom"], ranks=2)
    assert drained.step < after.step <= regrown.step, (drained.step, after.step, regrown.step)
    assert (grown["preemptions"], grown.get("restarts", 0)) == (1, 0), grown
    assert_no_step_lost(e2e, regrown.step)
    # rank 2 trained until the drain, then not until the job grew back, then from the step after
    assert_trained(e2e, 2, (1, drained.step), (regrown.step + 1, None))

    events = e2e.reasons()
    assert "Preempted" in events and "RankFailed" not in events, events
    # one shrink and one grow, nothing more: no try to grow that did not fit, no second shrink
    assert (events.count("Resizing"), events.count("Resized")) == (2, 2), events
    shrink = messages(e2e, "Resizing")[0]["message"]
    assert "could not be placed within elastic.waitSeconds 10s" in shrink and shrink.endswith(
        "restarting with WORLD_SIZE 2 (elastic.minReplicas 2); deleting the ranks, none has trained yet"), shrink
    assert [e["message"].split(":")[0] for e in messages(e2e, "Resized")] == [
        f"WORLD_SIZE 3 -> 2 (2 of spec.replicas 3) in incarnation {short['incarnation']}",
        f"WORLD_SIZE 2 -> 3 in incarnation {grown['incarnation']}"]


def test_replicas_patched_on_a_running_job_resizes_it_at_one_checkpoint(e2e: Env) -> None:
    e2e.create(e2e.example("--losses", str(e2e.losses()), *ARGS, replicas=3))
    e2e.wait_phase("Running", timeout=150)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)

    patched_at = time.monotonic()
    e2e.kubectl("patch", "tj", "mlp", "--type=merge", "-p", json.dumps({"spec": {"replicas": 2}}))
    stopping = e2e.wait("the resize", lambda: (st := e2e.status()).get("stopReason") == "Resize" and st, timeout=60)
    assert stopping["stopMessage"] == "spec.replicas changed to 2 while incarnation 1 runs with WORLD_SIZE 3", stopping
    status = e2e.wait_phase("Running", incarnation=2, timeout=180)
    print(f"replicas patched -> incarnation 2 Running after {time.monotonic() - patched_at:.1f}s")
    assert (status["worldSize"], status["ready"]) == (2, "2/2"), status
    assert (status.get("preemptions", 0), status.get("restarts", 0)) == (0, 0), status

    new = incarnation_pods(e2e, 2)
    assert [p["metadata"]["name"] for p in new] == ["mlp-2-0", "mlp-2-1"]
    assert [world_size(p) for p in new] == ["2", "2"]
    saved = exit_checkpoint(e2e, status["resumeFrom"], ranks=3)
    assert {m.incarnation for m in saved.manifests.values()} == {"1"}
    assert all(p["metadata"]["annotations"]["torpor.dev/resume-from"] == saved.name for p in new)
    assert_no_step_lost(e2e, saved.step)
    assert_trained(e2e, 1, (1, None))
    assert_trained(e2e, 2, (1, saved.step))  # the rank the resize dropped trained up to its save

    events = e2e.reasons()
    assert (events.count("Resizing"), events.count("Resized")) == (1, 1), events
    assert "Preempted" not in events and "RankFailed" not in events and "SpecChanged" not in events, events

    # and patched back up: the same way, from the 2-rank incarnation's checkpoint, on 3 ranks
    grown = patch_replicas(e2e, 3, incarnation=3)
    from_two = exit_checkpoint(e2e, grown["resumeFrom"], ranks=2)
    assert {m.incarnation for m in from_two.manifests.values()} == {"2"}
    assert_no_step_lost(e2e, from_two.step)
    assert_trained(e2e, 2, (1, saved.step), (from_two.step + 1, None))  # back, from the 2-rank save
    events = e2e.reasons()
    assert (events.count("Resizing"), events.count("Resized")) == (2, 2), events


def test_an_fsdp2_job_patched_from_two_ranks_to_three_resumes_resharded_at_one_checkpoint(e2e: Env) -> None:
    # examples/fsdp2.py: each rank holds its shard of every parameter and of Adam's state; on 3
    # ranks the new incarnation loads the 2-rank checkpoint's .distcp shards resharded (DCP's
    # planner over torpor's reader) and goes on from the step after the save.
    body = e2e.example(replicas=2, checkpoint={"saveSteps": 20})
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["command"] = [sys.executable, "examples/fsdp2.py"]
    container["args"] = ["--epochs", "500", "--step-delay", "0.05", "--losses", str(e2e.losses())]
    e2e.create(body)
    e2e.wait_phase("Running", timeout=150)
    e2e.wait("a periodic checkpoint", lambda: e2e.status().get("lastCheckpoint"), timeout=120)

    status = patch_replicas(e2e, 3, incarnation=2)

    saved = exit_checkpoint(e2e, status["resumeFrom"], ranks=2)
    keys = e2e.object_keys()
    assert {f"rank_{r}/{saved.name}.distcp" for r in (0, 1)} <= set(keys), keys  # sharded, by both ranks
    assert_no_step_lost(e2e, saved.step)
    assert_trained(e2e, 2, (saved.step + 1, None))  # the new rank starts right after the save
    assert all(math.isfinite(s["loss"]) for s in e2e.steps()), "a resharded load that trains on garbage"
    events = e2e.reasons()
    assert (events.count("Resizing"), events.count("Resized")) == (1, 1), events
