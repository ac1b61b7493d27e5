"""Shared helpers of the runtime tests: a tiny model, real processes, polling with deadlines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torpor
from processes import free_port, poll  # the one free-port helper and the one polling loop (hack/)

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "examples" / "train.py"
PLAIN_LOOP = REPO / "examples" / "plain_loop.py"


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy (fast: steps are milliseconds)."""
    return poll(condition, timeout=timeout, what=what, interval=interval)


def flip_a_byte(path: Path) -> None:
    """Corrupt a stored file in place: one bit in its middle (its size stays, its digest does not)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines of a JSON-lines file (a line being written is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def tiny_setup(seed: int = 0, samples: int = 64, batch_size: int = 8) -> tuple[nn.Module, nn.Module, Any, DataLoader]:
    """A small network with dropout over shuffled synthetic data: exercises every generator."""
    torch.manual_seed(seed)
    x = torch.randn(samples, 6)
    y = (x[:, :3].sum(dim=1) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return net, nn.CrossEntropyLoss(), opt, loader


class Recorder(torpor.Callback):
    """Remembers every completed step's global number and loss."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: dict[int, float] = {}

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        args = run_context.original_args()
        self.steps.append(args.cur_step_num)
        self.losses[args.cur_step_num] = float(args.net_outputs)


class StopAt(torpor.Callback):
    """Requests a stop after a given global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        if run_context.original_args().cur_step_num >= self.step:
            run_context.request_stop()


class KillInStep(torpor.Callback):
    """Sends a real signal to this process from inside a given global step."""

    def __init__(self, step: int, sig: int = signal.SIGTERM) -> None:
        self.step, self.sig = step, sig

    def on_train_step_begin(self, run_context: torpor.RunContext) -> None:
        if run_context.original_args().cur_step_num == self.step:
            os.kill(os.getpid(), self.sig)


class PositionLoader:
    """A loader that keeps its own position, as torchdata's ``StatefulDataLoader`` does; not a DataLoader.

    Every epoch hands out ``(x, y)`` batches in an order drawn, when the epoch starts, from the
    loader's own generator (seeded with ``seed``: one stream per rank). ``state_dict()`` is where
    the iterator handed out last stands (its ``epoch`` and order, the batches it produced,
    whether it ran out) and the generator; after ``load_state_dict`` the next ``iter()``
    continues from there, unless that iterator had run out: then, as after any iterator, a new
    epoch starts. ``produced`` counts the batches it ever produced (a resume must not produce
    consumed ones again).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.batches_per_epoch = -(-len(x) // batch_size)
        self.epoch, self.index, self.finished = 0, 0, True
        self.order = torch.arange(len(x))
        self.generator = torch.Generator().manual_seed(seed)
        self.produced = 0
        self._continue = False

    def __iter__(self) -> Any:
        if not self._continue:
            self.epoch, self.index, self.finished = self.epoch + 1, 0, False
            self.order = torch.randperm(len(self.x), generator=self.generator)
        self._continue = False
        return self._batches()

    def _batches(self) -> Any:
        while self.index < self.batches_per_epoch:
            ids = self.order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
            self.index += 1
            self.produced += 1
            yield self.x[ids], self.y[ids]
        self.finished = True

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "finished": self.finished, "order": self.order,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self.finished = int(state["epoch"]), int(state["index"]), bool(state["finished"])
        self.order = state["order"]
        self.generator.set_state(state["generator"])
        self._continue = not self.finished


class SizedPositionLoader(PositionLoader):
    """A :class:`PositionLoader` with a ``len``: the loop knows the epoch's length in advance."""

    def __len__(self) -> int:
        return self.batches_per_epoch


class TrainedOn(torpor.Callback):
    """The sample ids of every step's batch, by global step (what a user checks the data order by)."""

    def __init__(self, x: torch.Tensor) -> None:
        self._ids = {row.numpy().tobytes(): i for i, row in enumerate(x)}
        self.steps: dict[int, list[int]] = {}

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        args = run_context.original_args()
        self.steps[args.cur_step_num] = [self._ids[row.numpy().tobytes()] for row in args.last_batch[0]]


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The test's environment without inherited TORPOR_* or torch variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TORPOR_") and k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                         "MASTER_PORT"}}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


# --- rank processes forked from a torch-imported server (tests/runtime/rank_forkserver.py) ---

_IMPORT_TIME_ENV = ("TORCH_", "TORCHDYNAMO", "TORCHINDUCTOR", "OMP_", "MKL_", "KMP_", "LD_", "CUDA_", "PYTHON")


class ForkedRank:
    """A rank forked by the fork server, with the parts of :class:`subprocess.Popen` the tests
    use: ``pid``, ``args``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``terminate``,
    ``kill`` (``returncode`` as Popen's: ``-N`` for a death by signal N)."""

    def __init__(self, conn: Any, args: list[str]) -> None:
        self._conn, self.args = conn, args
        self._buffer = b""
        self.returncode: int | None = None
        message = self._message(None)
        assert message is not None
        self.pid: int = message["pid"]

    def _message(self, timeout: float | None) -> dict[str, Any] | None:
        """The server's next message, or ``None`` if none came within ``timeout`` seconds."""
        import select

        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                return None
            data = self._conn.recv(4096)
            if not data:
                raise RuntimeError(f"the fork server went away before rank {self.args} ended")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _read(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        message = self._message(timeout)
        if message is None:
            return None
        self.returncode = os.waitstatus_to_exitcode(message["status"])
        self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._read(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._read(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _ForkServer:
    """The session's fork server, started at the first rank and stopped at exit; ``None`` from
    :meth:`launch` where a rank needs a fresh interpreter (a variable read at import time differs)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._path = ""
        self._env: dict[str, str] = {}

    def _start(self) -> None:
        import atexit
        import tempfile

        self._path = os.path.join(tempfile.mkdtemp(prefix="torpor-forkserver-"), "socket")
        self._env = child_env({})
        self._proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("rank_forkserver.py")),
                                       self._path], env=self._env, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the rank fork server did not start")
        atexit.register(self._stop)

    def _stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)

    def launch(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> ForkedRank | None:
        import socket

        if os.environ.get("TORPOR_TEST_NO_FORKSERVER"):
            return None
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        same = all(env.get(k) == self._env.get(k) for k in {*env, *self._env}
                   if k.startswith(_IMPORT_TIME_ENV) and k != "PYTHONPATH")  # the child builds sys.path
        if not same:
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self._path)
        conn.sendall(json.dumps({"argv": argv, "env": env, "cwd": str(cwd), "log": str(log)}).encode() + b"\n")
        return ForkedRank(conn, [sys.executable, *argv])


FORK_SERVER = _ForkServer()


def start_rank(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> ForkedRank | subprocess.Popen[bytes]:
    """Run ``python argv...`` as a rank process with ``env`` in ``cwd``, stdout and stderr appended
    to ``log``: forked from the fork server, or a fresh interpreter where the rank needs one."""
    forked = FORK_SERVER.launch(argv, env, cwd, log)
    if forked is not None:
        return forked
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *argv], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)


def launch_ranks(world: int, extra_env: dict[str, str], argv: list[str], logdir: Path, *,
                 script: Path = TRAIN, rank_env: dict[int, dict[str, str]] | None = None,
                 ) -> list[Any]:
    """Start ``script`` (``examples/train.py``) as ``world`` ranks on loopback (gloo), logs in ``logdir``.

    ``rank_env`` adds variables to single ranks (e.g. one rank's S3 endpoint behind a fault proxy).
    """
    port = free_port()
    procs = []
    for rank in range(world):
        env = child_env({
            **extra_env,
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
            "TORPOR_TERMINATION_LOG": str(logdir / f"termination-{rank}.json"),
            **(rank_env or {}).get(rank, {}),
        })
        log = logdir / f"rank-{rank}.log"
        log.write_bytes(b"")
        procs.append(start_rank([str(script), *argv], env, logdir, log))
    return procs


def wait_all(procs: list[subprocess.Popen[bytes]], logdir: Path, timeout: float = 240) -> list[int]:
    """Exit codes of every rank; on timeout kill them and fail with their logs."""
    deadline = time.monotonic() + timeout
    codes = []
    for rank, proc in enumerate(procs):
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} did not exit:\n{logs(logdir)}") from None
    return codes


def logs(logdir: Path) -> str:
    """Every rank's log, for failure messages."""
    files = sorted(logdir.glob("rank-*.log"))
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in files)


def five_mib_parts(bucket: str, prefix: str) -> Any:
    """An S3 store with the smallest parts S3 allows and 2 in flight: multipart paths in MiBs."""
    from torpor.storage import S3Settings, S3Storage

    mib = 1024 * 1024
    return S3Storage(bucket, prefix, S3Settings(multipart_chunksize=5 * mib, multipart_threshold=5 * mib,
                                                max_concurrency=2))



class IndexStream(torch.utils.data.IterableDataset):
    """An ``IterableDataset`` of ``(x, y, index)`` samples, this rank's share of them (every ``world``-th)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> None:
        self.x, self.y, self.rank, self.world = x, y, rank, world

    def __iter__(self) -> Any:
        for i in range(self.rank, len(self.x), self.world):
            yield self.x[i], self.y[i], i


RESIZE_SAMPLES = 120
"""Samples of :func:`resize_data`: 10 steps of 4 per rank per epoch on 3 ranks, 15 on 2."""


def resize_data(kind: str, rank: int, world: int, batch_size: int = 4) -> tuple[Any, dict[str, Any]]:
    """``(loader, state)`` of one rank for the resize tests: batches of ``(x, y, sample index)``.

    ``kind``: ``distributed`` (a ``DataLoader`` with a ``DistributedSampler``: what a resume on
    another world size continues), ``random`` (``shuffle=True``: each rank its own order),
    ``iterable`` (an :class:`IndexStream`), ``stateful`` (a :class:`SizedPositionLoader` in ``state=``).
    """
    g = torch.Generator().manual_seed(7)
    x = torch.randn(RESIZE_SAMPLES, 6, generator=g)
    y = (x[:, :3].sum(dim=1) > 0).long()
    data = TensorDataset(x, y, torch.arange(len(x)))
    if kind == "distributed":
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        return DataLoader(data, batch_size=batch_size, sampler=sampler), {}
    if kind == "random":
        return DataLoader(data, batch_size=batch_size, shuffle=True), {}
    if kind == "iterable":
        return DataLoader(IndexStream(x, y, rank, world), batch_size=batch_size), {}
    if kind == "stateful":
        loader = SizedPositionLoader(x[rank::world], y[rank::world], batch_size, seed=rank)
        return loader, {"loader": loader}
    raise ValueError(f"kind must be distributed, random, iterable or stateful, got {kind!r}")


def resize_net() -> tuple[nn.Module, torch.optim.Optimizer]:
    """The resize tests' model (dropout: the rank's generators matter) and its optimizer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 2))
    return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
