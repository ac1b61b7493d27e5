"""The operator imports torpor's public torch-free modules; they must not pull torch in."""

from __future__ import annotations

import subprocess
import sys

TORCH_FREE = ["torpor", "torpor.checkpoints", "torpor.retention", "torpor.storage", "torpor.transfer", "torpor.env",
              "torpor.termination", "torpor.errors", "torpor.crypto", "torpor.stale_temps"]


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
