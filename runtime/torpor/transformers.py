"""Hugging Face Transformers ``Trainer``: torpor's stop, save and resume as a ``TrainerCallback``.

The ``Trainer`` owns the loop, so torpor comes in as a callback::

    from torpor.transformers import TorporCallback

    torpor_cb = TorporCallback.from_env()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[torpor_cb])
    trainer.train(resume_from_checkpoint=torpor_cb.checkpoint_to_resume(args.output_dir))

What it adds to the ``Trainer``, and why:

* **Every rank stops after the same step.** SIGTERM or the GracefulExit file on *any* rank:
  at ``on_step_end`` the ranks reduce their request codes (one all-reduce MAX, at most every
  ``check_every_n_steps``: the only collective torpor adds), and where the result is not zero
  every rank sets ``control.should_save`` and ``control.should_training_stop`` at that step.
  HF's own ``enable_jit_checkpoint`` saves per rank after a timer, with no agreement, so ranks
  can save at different steps. The signal handler, its chaining and the file watcher are
  :class:`torpor.OnRequestExit`'s.
* **The Trainer's own checkpoint goes through torpor.** After the ``Trainer`` wrote
  ``checkpoint-{step}`` (model, optimizer, scheduler, ``trainer_state.json`` on the main
  process, ``rng_state_{rank}.pth`` on each), ``on_save`` puts what *this rank* wrote into the
  checkpoint root as its ``rank_{r}/{name}.ckpt`` partition (the files' bytes as ``uint8``
  tensors, so it loads with ``weights_only=True``) and, last, its manifest: torpor's writers,
  so S3 streaming, encryption, completeness and the operator's retention apply unchanged. The
  ranks then agree the save worked (else every rank raises ``CheckpointSaveError``).
  ``training_args.bin`` (a pickle) is never stored: a resume builds its own arguments.
  Periodic saves (``save_steps``) go the same way (``Reason.PERIODIC``), so the operator's
  retention counts them; the stop's save is ``Reason.EXIT``.
* **The process ends as torpor's loop ends it.** Under the operator (``TORPOR_JOB`` set, or
  ``exit_process=True``) ``on_train_end`` writes the termination message and raises
  ``SystemExit`` with the documented code (143 after a saved SIGTERM, 75 for the file); a run
  that ends without a stop writes ``completed``.
* **Resume** (:meth:`TorporCallback.checkpoint_to_resume`): the checkpoint torpor would pick
  (``TORPOR_RESUME_FROM``, else the newest resumable one of this run's prefix, falling back to
  older ones when a rank cannot read it), verified against its manifest, written out as a local
  HF checkpoint directory for ``trainer.train(resume_from_checkpoint=...)``; ``None`` on a
  fresh start.

Checkpoint names are ``{file_name}-{epoch}_{global_step}`` (``hf-2_40``): unlike torpor's own
loop the step is the ``Trainer``'s global step (as in HF's ``checkpoint-{global_step}``), the
epoch the one in progress, from 1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

try:
    import transformers
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ModuleNotFoundError as missing:  # the optional extra is not installed
    raise ModuleNotFoundError(f"torpor.transformers needs Hugging Face transformers ({missing}): "
                              "pip install 'torpor[transformers]'", name=missing.name) from missing

from torpor import _distributed
from torpor._exit import OnRequestExit, exit_options_from_env
from torpor._loading import UNLOADABLE, _all_read, _decided, _warn, load_shard, split_source
from torpor._saving import PendingSave, taken_names, write_pending
from torpor._state import SHARD_FORMAT
from torpor.checkpoints import Checkpoint, FileKind, Reason, check_name, checkpoint_name, unique_name
from torpor.crypto import Encryption
from torpor.env import RuntimeEnv, read_enc_key
from torpor.errors import CheckpointSaveError
from torpor.storage import Storage, open_storage
from torpor.termination import (
    EXIT_COMPLETED,
    SIGNAL_EXIT_BASE,
    StopReason,
    TerminationMessage,
    signal_from_exit_code,
    signal_name,
    write_termination_message,
)

__all__ = ["TorporCallback"]

_log = logging.getLogger("torpor")
_RNG_FILE = re.compile(r"^rng_state(?:_(?P<rank>[0-9]+))?\.pth$")
NEVER_STORED = frozenset({"training_args.bin"})
"""Files of an HF checkpoint torpor does not store: ``training_args.bin`` is a full pickle,
and nothing from the bucket is ever unpickled; the resumed run has its own arguments."""
PAYLOAD_KEY = "transformers_files"
"""Key of the shard payload holding the checkpoint's files: ``{relative path: uint8 tensor}``."""


def own_files(folder: Path, rank: int, main_process: bool) -> list[str]:
    """The files of HF checkpoint ``folder`` this rank wrote (relative paths, sorted).

    The main process writes everything but the other ranks' ``rng_state_{r}.pth``; every other
    rank only its own ``rng_state_{rank}.pth`` (on a shared file system it sees the others').
    """
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in NEVER_STORED or rel.startswith(".") or "/." in rel:
            continue
        m = _RNG_FILE.match(rel)
        if m is not None:
            if m["rank"] is None or int(m["rank"]) == rank:
                found.append(rel)
        elif main_process:
            found.append(rel)
    return found


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _epoch_of(state: TrainerState) -> int:
    """The epoch in progress (from 1) for the name and manifest; HF's ``state.epoch`` is a fraction."""
    return max(1, math.ceil(state.epoch or 0.0))


class TorporCallback(TrainerCallback):
    """Stop every rank of a ``Trainer`` at one step, store its checkpoints with torpor, resume them.

    Args:
        directory: checkpoint root, a path or ``s3://bucket/prefix``; default ``None``:
            ``TORPOR_CHECKPOINT_URI``, else ``./checkpoints``.
        file_name: name prefix of the checkpoints (``{file_name}-{epoch}_{global_step}``); a
            resume considers only this prefix's checkpoints.
        sig: the signal that requests a stop (catchable).
        config_file: JSON file whose ``{"GracefulExit": 1}`` requests a stop.
        check_every_n_steps: reduce the requests across ranks every this many global steps
            (1 = every step; larger saves collectives at the cost of up to n-1 extra steps).
        file_poll_seconds: how often the background thread looks at ``config_file``.
        exit_process: end the process with the documented code after a stop's save; default
            ``None``: only under the operator (``TORPOR_JOB`` set).
        save_periodic: also store the ``Trainer``'s periodic saves (``save_steps``), so they can
            be resumed from and the operator's retention counts them.
        enc_key: encrypt every file with this key; ``from_env`` reads ``TORPOR_ENC_KEY_FILE`` /
            ``TORPOR_ENC_KEY``.
        enc_mode: ``AES-GCM``, ``AES-CBC`` or ``SM4-CBC``.
        agree_late: read each check's all-reduce at the next check (default ``True``): it runs
            beside a step's compute instead of holding every step up, and every rank still
            stops at one step — one check after the request (``torpor._distributed.LateMax``).
            ``False``: a blocking all-reduce, acted on at the step it is made.

    Raises:
        ValueError: as :class:`torpor.OnRequestExit` for the arguments it shares (the message
            names the field and value), ``save_periodic`` or ``agree_late`` not a bool.
    """

    def __init__(
        self,
        directory: str | None = None,
        *,
        file_name: str = "hf",
        sig: int = signal.SIGTERM,
        config_file: str | None = None,
        check_every_n_steps: int = 1,
        file_poll_seconds: float = 1.0,
        exit_process: bool | None = None,
        save_periodic: bool = True,
        enc_key: bytes | None = None,
        enc_mode: str = "AES-GCM",
        agree_late: bool = True,
    ) -> None:
        if not isinstance(save_periodic, bool):
            raise ValueError(f"save_periodic must be a bool, got {save_periodic!r} ({type(save_periodic).__name__})")
        if not isinstance(agree_late, bool):
            raise ValueError(f"agree_late must be a bool, got {agree_late!r}")
        # The handler, its chaining, the file watcher and the validation of what they take are OnRequestExit's.
        self._exit = OnRequestExit(save_ckpt=False, save_export=False, file_name=file_name, directory=directory,
                                   sig=sig, config_file=config_file, check_every_n_steps=check_every_n_steps,
                                   file_poll_seconds=file_poll_seconds, exit_process=exit_process,
                                   enc_key=enc_key, enc_mode=enc_mode)
        self.directory = self._exit.directory
        """Checkpoint root."""
        self.file_name = file_name
        self.check_every_n_steps = check_every_n_steps
        self.exit_process = exit_process
        self.save_periodic = save_periodic
        self.encryption: Encryption | None = self._exit.encryption
        self.stop_message: TerminationMessage | None = None
        """What happened at the stop (also the termination message), ``None`` until one."""
        self.saved: list[str] = []
        """Names of the checkpoints this run stored, oldest first."""
        self.resumed_from: str | None = None
        """Name of the checkpoint :meth:`checkpoint_to_resume` materialised, if any."""
        self.agree_late = agree_late
        self._late = _distributed.LateMax()
        self._late_local = 0  # this rank's code in the reduction in flight
        self._stop: tuple[int, int] | None = None  # (agreed code, this rank's code) once a stop is agreed
        self._storage: Storage | None = None
        self._taken: set[str] | None = None
        self._token = ""

    @classmethod
    def from_env(cls, **overrides: Any) -> TorporCallback:
        """Configured from ``TORPOR_CHECKPOINT_URI``, ``TORPOR_EXIT_FILE``, ``TORPOR_EXIT_SIGNAL``,
        ``TORPOR_EXIT_CHECK_STEPS`` and the key variables; keyword arguments override them."""
        return cls(**{**exit_options_from_env(), **overrides})

    def _store(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.directory)
        return self._storage

    def _exits(self, env: RuntimeEnv) -> bool:
        return self.exit_process if self.exit_process is not None else env.under_operator

    # -- resume ----------------------------------------------------------------------
    def checkpoint_to_resume(self, output_dir: str | os.PathLike[str] | None = None) -> str | None:
        """Write the checkpoint a resume continues from as a local HF checkpoint directory.

        Every rank must call it (rank 0 picks, the others follow). The candidates are torpor's
        (:func:`torpor.load_checkpoint` with ``'latest'``): ``TORPOR_RESUME_FROM`` when set, then
        older resumable ones; else the newest resumable checkpoint of ``file_name``. Each rank
        reads rank 0's partition and its own, checked against their manifests; one agreement
        decides, and if any rank failed every rank moves on to the next older candidate.

        Args:
            output_dir: where to write it (``{output_dir}/torpor-resume/rank_{r}/{name}``, one
                directory per rank, so ranks sharing a file system never write the same file);
                default: a temporary directory.

        Returns:
            The directory for ``trainer.train(resume_from_checkpoint=...)``, or ``None`` when
            there is nothing to resume from (a fresh start).

        Raises:
            IntegrityError, OSError, ...: as ``torpor.load_checkpoint`` when no candidate could
                be read on every rank.
        """
        env = RuntimeEnv.from_environ()
        root, name = split_source(env.resume_from or "latest", self.directory)
        storage = open_storage(root)
        candidates = _decided(storage, name, [self.file_name], fallback=True)
        if not candidates:
            return None
        base = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="torpor-hf-"))
        keys = (self.encryption.key if self.encryption is not None else read_enc_key(),
                self.encryption.mode if self.encryption is not None else env.enc_mode)
        for index, ckpt in enumerate(candidates):
            files: dict[str, torch.Tensor] | None = None
            error: BaseException | None = None
            try:
                files = self._read_files(storage, ckpt, keys)
            except UNLOADABLE as exc:
                error = exc
            if _all_read(error, ckpt, storage):
                assert files is not None
                target = base / "torpor-resume" / f"rank_{_distributed.rank()}" / ckpt.name
                target.mkdir(parents=True, exist_ok=True)
                for rel, data in files.items():
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    (target / rel).write_bytes(data.numpy().tobytes())
                self.resumed_from = ckpt.name
                _log.info("resuming the Trainer from checkpoint %r in %s at step %d", ckpt.name, storage.uri,
                          ckpt.step)
                return str(target)
            if index + 1 >= len(candidates):
                if error is not None:
                    raise error
                raise CheckpointSaveError(f"no checkpoint in {storage.uri} could be read on every rank")
            why = f"{type(error).__name__}: {error}" if error is not None else "another rank could not read its part"
            _warn(f"checkpoint {ckpt.name!r} in {storage.uri} could not be loaded ({why}); "
                  f"trying the next older complete checkpoint {candidates[index + 1].name!r}")
        return None

    @staticmethod
    def _read_files(storage: Storage, ckpt: Checkpoint, keys: tuple[bytes | None, str | None]) -> dict[str, Any]:
        """Rank 0's files (model, optimizer, scheduler, trainer state) and this rank's own."""
        rank = _distributed.rank()
        files: dict[str, Any] = {}
        for r in sorted({0, rank} & set(ckpt.manifests)):
            manifest = ckpt.manifests[r]
            payload = load_shard(storage, manifest.shard, *keys, "cpu", manifest=manifest)
            if PAYLOAD_KEY not in payload:
                raise ValueError(f"checkpoint {ckpt.name!r} in {storage.uri} was not written by "
                                 f"torpor.transformers (rank {r}'s shard has no {PAYLOAD_KEY!r})")
            files.update(payload[PAYLOAD_KEY])
        return files

    # -- hooks -------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        """Install the signal handler (chained) and the file watcher; learn the names taken.
        A callback used for a second ``train()`` starts over: no stop, nothing saved yet."""
        self._stop, self.stop_message, self.saved = None, None, []
        self._late.take()
        self._exit._signum = None
        self._exit._install()
        self._taken = taken_names(self._store())
        # One token per run (rank 0's), in every manifest's save_id: a collective, so here, on every rank.
        self._token = _distributed.agreed_token()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """At the step boundary, every ``check_every_n_steps``: OR the ranks' requests; a stop
        makes every rank save this step and end training."""
        if self._stop is not None:
            return
        local = self._exit._local_code()
        if _distributed.is_initialized() and _distributed.world_size() > 1:
            if state.global_step % self.check_every_n_steps:
                return
            if self.agree_late:  # read the last check's reduction; this check's goes out now
                agreed, local_then = self._late.take(), self._late_local
                code = agreed[0] if agreed is not None else 0
                if not code:
                    self._late.start([local])
                    self._late_local = local
                local = local_then
            else:
                code = _distributed.max_over_ranks(local)
        else:
            code = local
        if code:
            self._stop = (code, local)
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Store what this rank wrote of ``checkpoint-{step}`` as its partition, manifest last;
        then every rank learns whether every rank's manifest exists."""
        if self._stop is None and not self.save_periodic:
            return
        env = RuntimeEnv.from_environ()
        storage = self._store()
        if self._taken is None:  # a save without on_train_begin: take both on every rank, as it would
            self._taken, self._token = taken_names(storage), _distributed.agreed_token()
        epoch = _epoch_of(state)
        name = unique_name(checkpoint_name(self.file_name, epoch, state.global_step), self._taken)
        self._taken.add(name)
        reason = Reason.EXIT if self._stop is not None else Reason.PERIODIC
        error: Exception | None = None
        try:
            folder = Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self._write(folder, name, reason, epoch, state, env, storage, args.should_save)
        except Exception as exc:  # every rank must still reach the agreement below
            error = exc
        failed = _distributed.failed_ranks(error is None)
        if failed:
            failure = CheckpointSaveError.of(name, storage.uri, failed, error)
            if self._exits(env):
                write_termination_message(self._message(StopReason.ERROR, 1, state, env, storage,
                                                        error=f"{type(failure).__name__}: {failure}"),
                                          env.termination_log)
            self._exit._uninstall()
            raise failure from error
        self.saved.append(name)
        if self._stop is not None:
            code, local = self._stop
            signum = signal_from_exit_code(code) if code > SIGNAL_EXIT_BASE else None
            self.stop_message = self._message(StopReason.SIGNAL if signum is not None else StopReason.FILE, code,
                                              state, env, storage, checkpoint=name,
                                              signal=signal_name(signum) if signum is not None else None,
                                              local=local == code)

    def _write(self, folder: Path, name: str, reason: Reason, epoch: int, state: TrainerState, env: RuntimeEnv,
               storage: Storage, main_process: bool) -> None:
        rank, world = _distributed.rank(), _distributed.world_size()
        rels = own_files(folder, rank, main_process)
        if not rels:
            raise FileNotFoundError(f"rank {rank} found none of its files in the Trainer's checkpoint {folder}")
        meta = {"name": name, "reason": reason.value, "epoch": epoch, "step": state.global_step,
                "transformers": transformers.__version__}
        payload = {"torpor_format": SHARD_FORMAT, "meta": json.dumps(meta),
                   PAYLOAD_KEY: {rel: _as_tensor((folder / rel).read_bytes()) for rel in rels}}
        fields = {
            "name": check_name(name), "rank": rank, "world_size": world, "epoch": epoch, "step": state.global_step,
            "step_in_epoch": state.global_step, "reason": reason,
            "save_id": f"{self._token}:{state.global_step}", "replicated_rank": 0, "job": env.job or "",
            "incarnation": env.incarnation, "resumed_from": self.resumed_from or "",
            "extra": {"framework": "transformers", "files": rels},
        }
        write_pending(PendingSave(name, reason, rank, world, [(FileKind.SHARD, payload)], fields), storage,
                      self.encryption)

    def _message(self, reason: StopReason, code: int, state: TrainerState, env: RuntimeEnv, storage: Storage | None,
                 **fields: Any) -> TerminationMessage:
        return TerminationMessage(reason=reason, exit_code=code, step=state.global_step, epoch=_epoch_of(state),
                                  rank=_distributed.rank(), world_size=_distributed.world_size(),
                                  directory=storage.uri if storage is not None else None, job=env.job,
                                  incarnation=env.incarnation or None, resumed_from=self.resumed_from,
                                  extra={"framework": "transformers"}, **fields)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Restore the previous handler; under the operator end the process as torpor's loop
        does: a stop's message and code (``SystemExit``), else the ``completed`` message."""
        self._late.take()  # a check still in flight: every rank started it, every rank waits for it
        self._exit._uninstall()
        env = RuntimeEnv.from_environ()
        if not self._exits(env):
            return
        if self.stop_message is None:
            write_termination_message(self._message(StopReason.COMPLETED, EXIT_COMPLETED, state, env, None),
                                      env.termination_log)
            return
        write_termination_message(self.stop_message, env.termination_log)
        _distributed.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(self.stop_message.exit_code)


