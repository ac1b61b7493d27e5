"""The operator imports torpor's public torch-free modules; they must not pull torch in."""

from __future__ import annotations

import subprocess
import sys

TORCH_FREE = ["torpor", "torpor.checkpoints", "torpor.retention", "torpor.storage", "torpor.transfer", "torpor.env",
              "torpor.termination", "torpor.errors", "torpor.crypto", "torpor.stale_temps", "torpor.folding",
              "torpor.run"]


def test_torch_free_modules_do_not_import_torch() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "import torpor\n"
        "torpor.CheckpointConfig(save_checkpoint_steps=3)\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'numpy')))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_torch_names_load_on_first_use() -> None:
    code = "import sys, torpor\nassert 'torch' not in sys.modules\ntorpor.Model\nassert 'torch' in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_replicated_run_never_imports_dcp(tmp_path) -> None:
    """Saving and resuming a model that is not sharded does not import torch.distributed.checkpoint
    (and what it brings that a plain script does not import: its planners, DTensor's ops)."""
    code = (
        "import sys, torch, torpor\n"
        "net = torch.nn.Linear(2, 1)\n"
        "opt = torch.optim.SGD(net.parameters(), lr=0.1)\n"
        f"monitor = torpor.CheckpointMonitor(prefix='net', directory={str(tmp_path)!r}, save_checkpoint_steps=2)\n"
        "loop = torpor.Loop(net, opt, callbacks=[monitor])\n"
        "for epoch in loop.epochs(1):\n"
        "    for x, y in loop.batches([(torch.ones(1, 2), torch.ones(1, 1))] * 4):\n"
        "        loss = torch.nn.functional.mse_loss(net(x), y)\n"
        "        opt.zero_grad(); loss.backward(); opt.step()\n"
        "        loop.step_end(loss)\n"
        f"loaded = torpor.load_checkpoint('latest', net, opt, directory={str(tmp_path)!r}, required=True)\n"
        "assert loaded.step == 4, loaded\n"
        "assert 'torch.distributed.checkpoint' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_lightning_is_imported_only_by_torpor_lightning() -> None:
    """``torpor[lightning]`` is optional: torpor and its torch-dependent names never import it."""
    code = (
        "import sys, torpor\n"
        "for name in ('Model', 'Loop', 'OnRequestExit', 'CheckpointMonitor', 'load_checkpoint'):\n"
        "    getattr(torpor, name)\n"
        "found = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not found, found\n"
        "import torpor.lightning\n"
        "assert 'lightning.pytorch' in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
