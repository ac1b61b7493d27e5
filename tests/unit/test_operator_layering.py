"""The operator's import rules: no torch, no private runtime module, a pure core without kopf."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "torpor_operator"
PURE = ("spec", "settings", "contract", "naming", "builders", "pods", "observing", "outcomes", "status", "decisions",
        "reconciling", "pruning", "placing", "shaping", "credentials", "deleting")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_module_imports_torch_or_a_private_runtime_module() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        for name in imports(path):
            assert name.split(".")[0] != "torch", f"{path.name} imports {name}"
            assert not name.startswith("torpor._"), f"{path.name} imports the private {name}"


def test_the_pure_core_imports_neither_kopf_nor_the_kubernetes_client() -> None:
    for module in PURE:
        for name in imports(PACKAGE / f"{module}.py"):
            assert name.split(".")[0] not in ("kopf", "kubernetes", "aiohttp"), f"{module} imports {name}"


def test_importing_the_core_loads_no_torch() -> None:
    code = ("import sys\n"
            + "".join(f"import torpor_operator.{m}\n" for m in PURE)
            + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'kopf', 'kubernetes'))\n"
            + "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""


def test_a_bad_setting_stops_the_operator_naming_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}
    env["TORPOR_MASTER_PORT"] = "http"
    out = subprocess.run([sys.executable, "-m", "torpor_operator"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 2
    assert "TORPOR_MASTER_PORT must be an integer, got 'http'" in out.stderr
