"""``transformers``/``accelerate`` are an optional extra: only ``torpor.transformers`` imports them."""

from __future__ import annotations

import subprocess
import sys


def test_torpor_and_its_training_api_never_import_transformers() -> None:
    code = (
        "import sys, torpor\n"
        "torpor.Model, torpor.Loop, torpor.load_checkpoint, torpor.callbacks_from_env()\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
