"""The operator as a child process, shared by the operator and end-to-end test fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class OperatorProcess:
    """``python -m torpor_operator`` as a child process, its output in ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "torpor_operator"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL, as an operator whose node died or that ran out of memory."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
