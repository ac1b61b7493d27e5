"""The operator as a child process, shared by the operator and end-to-end test fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from processes import start_server, stop_server


class OperatorProcess:
    """``python -m torpor_operator`` as a child process, its output in ``log_path``.

    Started like every server of the test harness (``processes.start_server``): in a session of
    its own and SIGKILLed by the kernel when the test runner dies, so a killed pytest leaves
    no operator acting on the control plane of the next run.
    """

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_server([sys.executable, "-m", "torpor_operator"], self.log_path, env=self.env)

    def kill(self) -> None:
        """SIGKILL, as an operator whose node died or that ran out of memory."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod; SIGKILL if it has not exited after 30 s."""
        stop_server(self.proc, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
