"""The seed's own example, carried over to PyTorch, runs and stops on a real SIGTERM."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torpor_harness import child_env

import torpor
from processes import poll
from torpor.checkpoints import FileKind, Reason, file_key, newest_complete, scan
from torpor.storage import LocalStorage

LENET = Path(__file__).resolve().parents[2] / "examples" / "lenet.py"


def _state_of(pid: int) -> str:
    """The process state letter of ``/proc/<pid>/stat`` (``T`` once SIGSTOP has taken hold)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _drain(stream: Any) -> bytes:
    """Everything already in the pipe of a stopped process (it writes nothing more)."""
    data = b""
    while select.select([stream], [], [], 0)[0]:
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            break
        data += chunk
    return data


def test_lenet_seed_example_saves_ckpt_and_pt2_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(LENET), "--epochs", "50"], cwd=tmp_path, env=child_env({}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    assert proc.stdout is not None
    seen = b""
    while b"epoch 1 step 3 " not in seen:  # training is under way
        chunk = os.read(proc.stdout.fileno(), 65536)
        assert chunk, seen.decode()
        seen += chunk
    # Freeze it, see the last step it reported, then deliver SIGTERM and let it go on: the
    # handler runs before the next step boundary, so the stop is exactly one step later.
    proc.send_signal(signal.SIGSTOP)
    poll(lambda: _state_of(proc.pid) == "T", timeout=30, what="the example to stop", interval=0.01)
    seen += _drain(proc.stdout)
    # print() writes the text and its newline in two writes (PYTHONUNBUFFERED): a line without
    # its newline yet is a step whose boundary has already been checked.
    lines = [ln for ln in seen.decode().splitlines() if ln.startswith("epoch ")]
    signalled_after = int(lines[-1].split()[3])
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    rest, _ = proc.communicate(timeout=120)
    out = (seen + rest).decode()
    assert proc.returncode == 0, out  # outside the operator, train() returns
    steps = [int(ln.split()[3]) for ln in out.splitlines() if ln.startswith("epoch ")]
    assert steps[-1] == signalled_after + 1, out  # the step in progress when the signal came, no more

    root = tmp_path / "checkpoints"  # the run's checkpoint root, not the seed's "./"
    store = LocalStorage(root)
    saved = newest_complete(scan(store))
    assert saved is not None and saved.step == signalled_after + 1
    assert {m.reason for m in saved.manifests.values()} == {Reason.EXIT}
    export = saved.manifests[0].file(FileKind.EXPORT)
    export_key = export.key if export is not None else file_key(saved.name, 0, FileKind.EXPORT)
    assert saved.name.startswith("LeNet5") and store.exists(export_key)
    loaded = torpor.load_checkpoint(saved.name, network=_lenet(), directory=str(root))
    assert loaded is not None and loaded.step == signalled_after + 1
    assert saved.name == f"LeNet5-{loaded.epoch}_{loaded.step_in_epoch}"  # a name per save, with its step
    program = torch.export.load(str(root / export_key))
    assert program.module()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def _lenet() -> torch.nn.Module:
    sys.path.insert(0, str(LENET.parent))
    try:
        from lenet import LeNet5
    finally:
        sys.path.remove(str(LENET.parent))
    return LeNet5()
