"""The operator imports torpor's public torch-free modules; they must not pull torch in."""

from __future__ import annotations

import subprocess
import sys

TORCH_FREE = ["torpor", "torpor.checkpoints", "torpor.retention", "torpor.storage", "torpor.transfer", "torpor.env",
              "torpor.termination", "torpor.errors", "torpor.crypto", "torpor.stale_temps", "torpor.folding",
              "torpor.run"]


def _prints_ok(code: str) -> None:
    """Run ``code`` in a fresh interpreter (nothing imported yet): it must print ``ok``."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok", result.stdout


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
    _prints_ok(code)


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
    _prints_ok(code)


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
    _prints_ok(code)


def test_torpor_and_its_training_api_never_import_transformers() -> None:
    """``torpor[transformers]`` is optional: only ``torpor.transformers`` imports transformers/accelerate."""
    _prints_ok(
        "import sys, torpor\n"
        "torpor.Model, torpor.Loop, torpor.load_checkpoint, torpor.callbacks_from_env()\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )


def test_an_integration_without_its_extra_says_which_extra_to_install() -> None:
    # None in sys.modules makes an import fail as a missing package does (ModuleNotFoundError)
    for module, package, extra in (("torpor.lightning", "lightning", "lightning"),
                                   ("torpor.transformers", "transformers", "transformers")):
        _prints_ok(
            f"import sys\nsys.modules[{package!r}] = None\n"
            "try:\n"
            f"    import {module}\n"
            "except ModuleNotFoundError as exc:\n"
            f"    assert \"pip install 'torpor[{extra}]'\" in str(exc), exc\n"
            f"    assert exc.name.split('.')[0] == {package!r}, exc.name\n"
            "    print('ok')\n"
        )
