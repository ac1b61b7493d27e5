"""One container as a local process: launch, signal, reap, and its `containerStatuses` entry.

Policy (when to start, restart or stop) belongs to `nodeagent_pods.PodWorker`; this module
only knows how a container process is run and how its end is recorded, as kubelet does:

* the process runs `nodeagent_launch` under `unshare --mount --uts` in a session and
  process group of its own (so a signal reaches everything it started), with stdout and
  stderr appended to its log file;
* when it ends, whatever is left of its process group is SIGKILLed (a container's
  processes end with it), the exit code is taken (128 + signal when killed), and the
  termination message is read from its file (at most 4096 bytes), or, with
  `terminationMessagePolicy: FallbackToLogsOnError` and a failure, from the log tail
  (last 80 lines, at most 2048 bytes).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from processes import die_with_starting_thread

JsonDict = dict[str, Any]

LAUNCHER = Path(__file__).with_name("nodeagent_launch.py")
UNSHARE = ["unshare", "--mount", "--uts", "--propagation", "private", "--"]
MAX_MESSAGE = 4096
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def terminated_state(started_at: str | None, code: int, reason: str, message: str) -> JsonDict:
    """A `state.terminated` object."""
    state = {"exitCode": code, "reason": reason, "startedAt": started_at or now_iso(), "finishedAt": now_iso()}
    if message:
        state["message"] = message
    return state


@dataclass
class Container:
    """The runtime state of one container of a pod."""

    spec: JsonDict
    init: bool
    log_path: Path
    message_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restart_count: int = 0
    started_at: str | None = None
    log_offset: int = 0  # where this run's output starts in the log file
    container_id: str = ""
    terminated: JsonDict | None = None  # the current `state.terminated`, if it ended
    last_state: JsonDict = field(default_factory=dict)
    waiting: tuple[str, str] = ("ContainerCreating", "")
    next_start: float = 0.0  # monotonic time before which it must not (re)start

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def running(self) -> bool:
        return self.proc is not None

    @property
    def restartable(self) -> bool:
        """A native sidecar: an init container with `restartPolicy: Always`, which runs beside
        the containers (restarted whenever it exits) and is stopped after them."""
        return self.init and self.spec.get("restartPolicy") == "Always"

    def launch(self, spec: JsonDict, spec_path: Path) -> None:
        """Start the process described by `spec` (see `nodeagent_launch`)."""
        spec_path.write_text(json.dumps(spec))
        self.message_path.write_bytes(b"")
        with open(self.log_path, "ab") as log:
            self.log_offset = log.tell()
            self.proc = subprocess.Popen(
                [*UNSHARE, sys.executable, str(LAUNCHER), str(spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=spec["env"],
                # The pod's worker thread starts it and kills it before ending, so the death
                # signal fires only if the whole agent (or the pytest hosting it) is killed.
                preexec_fn=die_with_starting_thread,
            )
        self.started_at = now_iso()
        self.container_id = f"torpor://{self.proc.pid}"
        self.terminated = None

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the container's whole process group, if it runs."""
        if self.proc is not None:
            _killpg(self.proc.pid, sig)

    def poll(self) -> bool:
        """If the process has exited, record `terminated` and return True."""
        proc = self.proc
        if proc is None or proc.poll() is None:
            return False
        _killpg(proc.pid, signal.SIGKILL)  # whatever it left behind in its group
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        message = self.message_path.read_bytes()[:MAX_MESSAGE].decode(errors="replace")
        if not message and code != 0 and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = _log_tail(self.log_path, self.log_offset)
        self.proc = None
        self.terminated = terminated_state(self.started_at, code, "Completed" if code == 0 else "Error", message)
        return True

    def status(self) -> JsonDict:
        """This container's entry in `containerStatuses` / `initContainerStatuses`."""
        if self.proc is not None:
            state: JsonDict = {"running": {"startedAt": self.started_at}}
        elif self.terminated is not None:
            state = {"terminated": self.terminated}
        else:
            reason, message = self.waiting
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        status = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.proc is not None and (not self.init or self.restartable),
            "started": self.proc is not None,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": self.last_state,
        }
        if self.container_id and (self.proc is not None or self.terminated is not None):
            status["containerID"] = self.container_id
        return status


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _log_tail(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        lines = f.read().splitlines()[-FALLBACK_LOG_LINES:]
    return b"\n".join(lines)[-FALLBACK_LOG_BYTES:].decode(errors="replace")
