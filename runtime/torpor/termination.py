"""Exit codes and the termination message: how a rank tells the operator why it ended.

Under the operator (``TORPOR_JOB`` set) a rank that stopped on request saves, writes one JSON
object to ``TORPOR_TERMINATION_LOG`` (default ``/dev/termination-log``, which Kubernetes
copies into the pod status) and exits with:

====================  =========================================================================
Exit code             Meaning
====================  =========================================================================
``0``                 Training finished (``reason: "completed"``).
``128 + signum``      Stopped on a signal after saving (``reason: "signal"``): 143 for SIGTERM,
                      130 for SIGINT, 138 for SIGUSR1. Every rank uses the code of the job-wide
                      request, also ranks that did not receive the signal themselves
                      (``"local": false``), as Lightning exits 143 after a SIGTERM save.
``75``                Stopped by ``{"GracefulExit": 1}`` in the exit file after saving
                      (``reason: "file"``). 75 is ``EX_TEMPFAIL`` of sysexits.h, "try again
                      later", and lies outside the 128+N range of signals.
``1``                 An exception escaped training (``reason: "error"``, Python's own code).
====================  =========================================================================

When several requests meet at one step, a signal wins over the file (the higher code of the
cross-rank MAX reduction). Outside the operator a stop just ends ``train()`` normally.

Torch-free: the operator imports the codes and :class:`TerminationMessage` to parse pods'
messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import warnings
from dataclasses import asdict, dataclass, field
from enum import StrEnum

EXIT_COMPLETED = 0
EXIT_ERROR = 1
EXIT_FILE_REQUEST = 75
SIGNAL_EXIT_BASE = 128
MESSAGE_LIMIT = 4096
"""Bytes Kubernetes keeps of a termination message; longer messages are truncated to fit."""


def signal_exit_code(signum: int) -> int:
    """``128 + signum``: the shell's convention for "ended by a signal" (143 for SIGTERM)."""
    return SIGNAL_EXIT_BASE + int(signum)


def signal_from_exit_code(code: int) -> int | None:
    """The signal a stop code stands for, or ``None`` for 0, 1, 75 and others."""
    if SIGNAL_EXIT_BASE < code < SIGNAL_EXIT_BASE + 65:
        return code - SIGNAL_EXIT_BASE
    return None


class StopReason(StrEnum):
    """The ``reason`` field of a termination message."""

    SIGNAL = "signal"
    FILE = "file"
    COMPLETED = "completed"
    ERROR = "error"


@dataclass(frozen=True)
class TerminationMessage:
    """The JSON a rank writes before it exits under the operator."""

    reason: StopReason
    """Why the rank ended."""
    exit_code: int
    """The code the process exits with (see the module table)."""
    checkpoint: str | None = None
    """Name of the checkpoint saved on the way out (``Net-2_7``), ``None`` if none was saved."""
    step: int | None = None
    """Global step after which the rank stopped."""
    epoch: int | None = None
    """Epoch in progress when it stopped."""
    signal: str | None = None
    """Signal name for ``reason == "signal"`` (``SIGTERM``)."""
    local: bool | None = None
    """Whether this rank received the request itself, or followed another rank's."""
    rank: int | None = None
    world_size: int | None = None
    directory: str | None = None
    """Checkpoint root the checkpoint was saved under."""
    job: str | None = None
    incarnation: str | None = None
    error: str | None = None
    """``Type: message`` of the exception for ``reason == "error"``."""
    resumed_from: str | None = None
    """Name of the checkpoint this run actually loaded at its start (after any fallback to an
    older one, see :mod:`torpor._loading`), ``None`` for a fresh start."""
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> str:
        """Compact JSON within Kubernetes' 4096-byte limit (the error text is cut first)."""
        doc = {k: v for k, v in asdict(self).items() if v is not None and v != {}}
        doc["reason"] = self.reason.value
        text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
        if len(text.encode()) > MESSAGE_LIMIT and self.error:
            over = len(text.encode()) - MESSAGE_LIMIT
            doc["error"] = self.error[: max(0, len(self.error) - over - 16)] + "…"
            text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
        return text

    @classmethod
    def from_json(cls, text: str) -> TerminationMessage:
        """Parse a message; ``ValueError`` naming the problem if it is not one of ours."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"termination message is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or "reason" not in doc or "exit_code" not in doc:
            raise ValueError(f"termination message lacks 'reason' or 'exit_code': {text[:200]!r}")
        known = {f for f in cls.__dataclass_fields__}
        args = {k: v for k, v in doc.items() if k in known}
        args["reason"] = StopReason(doc["reason"])
        return cls(**args)


def signal_name(signum: int) -> str:
    """``15`` → ``'SIGTERM'`` (the number as text for a signal Python has no name for)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def write_termination_message(message: TerminationMessage, path: str) -> bool:
    """Write the message; a path that cannot be written is a warning, never a crash.

    Returns whether it was written. Locally ``/dev/termination-log`` usually does not exist;
    the exit code still tells the story.
    """
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(message.to_json())
            f.flush()
            with contextlib.suppress(OSError):  # a character device cannot be fsynced
                os.fsync(f.fileno())
    except OSError as exc:
        warnings.warn(f"termination message not written to {path!r}: {exc}", stacklevel=2)
        return False
    return True
