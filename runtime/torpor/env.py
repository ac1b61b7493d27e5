"""The ``TORPOR_*`` environment contract between the operator and the runtime.

The operator sets these variables in every rank's pod; ``from_env()`` constructors read them,
so one script runs on a laptop (nothing set: local defaults), under ``torchrun`` (only the
torch variables set) and in a pod (everything set) without a change. Torch-free: the
operator imports the names from here when it builds pods.

=============================  ==============================================================
Variable                       Meaning (default when unset)
=============================  ==============================================================
``TORPOR_CHECKPOINT_URI``      Checkpoint root: a path or ``s3://bucket/prefix``; periodic and
                               exit saves and ``resume='latest'`` all use it (``./checkpoints``)
``TORPOR_CHECKPOINT_PREFIX``   Periodic checkpoint prefix (``CKP``)
``TORPOR_EXIT_FILE``           GracefulExit JSON file, e.g. a mounted ConfigMap (none)
``TORPOR_EXIT_SIGNAL``         Signal that requests a stop, by name or number (``SIGTERM``)
``TORPOR_EXIT_CHECK_STEPS``    Reduce the stop flag across ranks every k steps (``1``)
``TORPOR_RESUME_FROM``         Checkpoint name every rank resumes from; ``latest`` or empty
                               means the newest complete one (empty)
``TORPOR_SAVE_STEPS``          Periodic save every N steps (``1``, or ``0`` if seconds set);
                               both ``0``: no periodic saves, only the exit save on a stop
                               and the final save when training ends
``TORPOR_SAVE_SECONDS``        Periodic save every S seconds; overrides steps (``0``)
``TORPOR_KEEP_MAX``            Keep the newest N complete checkpoints (``5``)
``TORPOR_KEEP_PER_N_MINUTES``  Keep the newest per N-minute window; overrides keep max (``0``)
``TORPOR_ASYNC_SAVE``          ``1``/``true``: periodic saves upload in the background (``0``)
``TORPOR_ENC_MODE``            ``AES-GCM``, ``AES-CBC`` or ``SM4-CBC`` (``AES-GCM`` when a key
                               is given)
``TORPOR_ENC_KEY_FILE``        File holding the encryption key, e.g. a mounted Secret (none);
                               see :func:`torpor.crypto.parse_key` for the accepted forms
``TORPOR_ENC_KEY``             The key itself, for local runs (``hex:…`` or ``base64:…``);
                               the file wins when both are set. Never logged or recorded
``TORPOR_TERMINATION_LOG``     Where the JSON termination message goes
                               (``/dev/termination-log``)
``TORPOR_JOB``                 ``namespace/name`` of the TrainingJob. Its presence means "under
                               the operator": stops then exit with the documented codes
``TORPOR_INCARNATION``         Incarnation number of the job; recorded in manifests
``RANK``, ``WORLD_SIZE``,      torch.distributed's own variables (``torchrun`` sets them too);
``LOCAL_RANK``,                ``WORLD_SIZE > 1`` makes :func:`torpor.init_distributed` start
``MASTER_ADDR``,               a process group
``MASTER_PORT``
``AWS_ENDPOINT_URL``,          boto3's own variables for S3 and S3-compatible stores (MinIO)
``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``
=============================  ==============================================================

The key is read by :func:`read_enc_key` when a ``from_env()`` constructor runs; it is never
part of :class:`RuntimeEnv` (whose ``repr`` may be logged) nor of any manifest.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

CHECKPOINT_URI = "TORPOR_CHECKPOINT_URI"
CHECKPOINT_PREFIX = "TORPOR_CHECKPOINT_PREFIX"
EXIT_FILE = "TORPOR_EXIT_FILE"
EXIT_SIGNAL = "TORPOR_EXIT_SIGNAL"
EXIT_CHECK_STEPS = "TORPOR_EXIT_CHECK_STEPS"
RESUME_FROM = "TORPOR_RESUME_FROM"
SAVE_STEPS = "TORPOR_SAVE_STEPS"
SAVE_SECONDS = "TORPOR_SAVE_SECONDS"
KEEP_MAX = "TORPOR_KEEP_MAX"
KEEP_PER_N_MINUTES = "TORPOR_KEEP_PER_N_MINUTES"
TERMINATION_LOG = "TORPOR_TERMINATION_LOG"
JOB = "TORPOR_JOB"
INCARNATION = "TORPOR_INCARNATION"
ASYNC_SAVE = "TORPOR_ASYNC_SAVE"
ENC_MODE = "TORPOR_ENC_MODE"
ENC_KEY_FILE = "TORPOR_ENC_KEY_FILE"
ENC_KEY = "TORPOR_ENC_KEY"

ALL = (CHECKPOINT_URI, CHECKPOINT_PREFIX, EXIT_FILE, EXIT_SIGNAL, EXIT_CHECK_STEPS, RESUME_FROM,
       SAVE_STEPS, SAVE_SECONDS, KEEP_MAX, KEEP_PER_N_MINUTES, TERMINATION_LOG, JOB, INCARNATION, ASYNC_SAVE,
       ENC_MODE, ENC_KEY_FILE, ENC_KEY)
"""Every ``TORPOR_*`` variable the runtime reads."""

DEFAULT_CHECKPOINT_URI = "./checkpoints"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {raw!r}")
    return value


def _bool(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1/0, true/false, yes/no or on/off, got {environ[name]!r}")


def read_enc_key(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The encryption key from ``TORPOR_ENC_KEY_FILE`` (preferred) or ``TORPOR_ENC_KEY``.

    Returns ``None`` when neither is set. The key is returned, never stored or printed.

    Raises:
        ValueError: the file cannot be read, or the value is malformed; the message names
            the variable and the file, never the key.
    """
    from torpor.crypto import parse_key  # cryptography only when a key is asked for

    env = os.environ if environ is None else environ
    path = env.get(ENC_KEY_FILE, "").strip()
    if path:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise ValueError(f"{ENC_KEY_FILE}={path!r} cannot be read: {exc.strerror}") from None
        return parse_key(raw, f"{ENC_KEY_FILE}={path!r}")
    value = env.get(ENC_KEY, "")
    if value:
        return parse_key(value.encode(), ENC_KEY)
    return None


def given_checkpoint_uri(environ: Mapping[str, str] | None = None) -> str | None:
    """``TORPOR_CHECKPOINT_URI`` when it is set, else ``None`` (not the ``./checkpoints`` default).

    ``from_env`` constructors pass a directory only when it was given, so a callback built by
    hand with its own directory in the same run is not taken to disagree with a default.
    """
    env = os.environ if environ is None else environ
    return env.get(CHECKPOINT_URI, "").strip() or None


def parse_signal(raw: str) -> int:
    """``'SIGTERM'``, ``'TERM'`` or ``'15'`` → 15.

    Raises:
        ValueError: an unknown name or number; the message names the value.
    """
    text = raw.strip()
    if text.lstrip("-").isdigit():
        number = int(text)
        if number not in {int(s) for s in signal.valid_signals()}:
            raise ValueError(f"{EXIT_SIGNAL} names no signal of this platform, got {raw!r}")
        return number
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"{EXIT_SIGNAL} names no signal of this platform, got {raw!r}") from None


@dataclass(frozen=True)
class RuntimeEnv:
    """The ``TORPOR_*`` variables, parsed and validated once (see the module table)."""

    checkpoint_uri: str = DEFAULT_CHECKPOINT_URI
    """Checkpoint root for every save and for ``resume='latest'``."""
    checkpoint_prefix: str = "CKP"
    """Periodic checkpoint prefix."""
    exit_file: str | None = None
    """GracefulExit JSON file, or ``None``."""
    exit_signal: int = int(signal.SIGTERM)
    """Signal number that requests a stop."""
    exit_check_steps: int = 1
    """Reduce the stop flag across ranks every this many steps."""
    resume_from: str | None = None
    """Checkpoint name to resume from; ``None`` means the newest complete one."""
    save_steps: int | None = None
    """``TORPOR_SAVE_STEPS`` if set."""
    save_seconds: int = 0
    """``TORPOR_SAVE_SECONDS``, 0 when unset."""
    keep_max: int | None = None
    """``TORPOR_KEEP_MAX`` if set."""
    keep_per_n_minutes: float = 0
    """``TORPOR_KEEP_PER_N_MINUTES``, 0 when unset."""
    termination_log: str = DEFAULT_TERMINATION_LOG
    """Path of the termination message."""
    job: str | None = None
    """TrainingJob ``namespace/name``; set means "under the operator"."""
    incarnation: str = ""
    """Incarnation of the job, recorded in manifests."""
    async_save: bool = False
    """``TORPOR_ASYNC_SAVE``: periodic saves upload in the background."""
    enc_mode: str | None = None
    """``TORPOR_ENC_MODE`` if set (the key is read separately, see :func:`read_enc_key`)."""
    enc_key_file: str | None = None
    """``TORPOR_ENC_KEY_FILE`` if set: where the key is, not the key."""

    @property
    def under_operator(self) -> bool:
        """Whether a stop ends the process with the documented exit codes."""
        return self.job is not None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> RuntimeEnv:
        """Read the variables (``os.environ`` by default).

        Raises:
            ValueError: a malformed value; the message names the variable and the value.
        """
        env = os.environ if environ is None else environ
        resume = env.get(RESUME_FROM, "").strip()
        return cls(
            checkpoint_uri=env.get(CHECKPOINT_URI, "").strip() or DEFAULT_CHECKPOINT_URI,
            checkpoint_prefix=env.get(CHECKPOINT_PREFIX, "").strip() or "CKP",
            exit_file=env.get(EXIT_FILE, "").strip() or None,
            exit_signal=parse_signal(env[EXIT_SIGNAL]) if env.get(EXIT_SIGNAL, "").strip() else int(signal.SIGTERM),
            exit_check_steps=_int(env, EXIT_CHECK_STEPS, 1, minimum=1),
            resume_from=None if resume in ("", "latest") else resume,
            save_steps=_int(env, SAVE_STEPS, -1) if env.get(SAVE_STEPS, "").strip() else None,
            save_seconds=_int(env, SAVE_SECONDS, 0),
            keep_max=_int(env, KEEP_MAX, -1) if env.get(KEEP_MAX, "").strip() else None,
            keep_per_n_minutes=_float(env, KEEP_PER_N_MINUTES, 0.0),
            termination_log=env.get(TERMINATION_LOG, "").strip() or DEFAULT_TERMINATION_LOG,
            job=env.get(JOB, "").strip() or None,
            incarnation=env.get(INCARNATION, "").strip(),
            async_save=_bool(env, ASYNC_SAVE),
            enc_mode=env.get(ENC_MODE, "").strip() or None,
            enc_key_file=env.get(ENC_KEY_FILE, "").strip() or None,
        )
