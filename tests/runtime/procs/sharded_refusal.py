"""One rank of runs whose sharded state torpor must refuse to save (never half of it, never a hang).

``--cases`` (comma-separated, run one after the other in this process):

* ``trainable``: FSDP2 with ``save_trainable_params=True`` (each rank holds only its shard
  of the parameters);
* ``saved-network``: FSDP2 with the sharded model itself as ``saved_network`` (each rank
  would write its shard of the weights as if it were the whole);
* ``zero-unintegrated``: DDP + ``ZeroRedundancyOptimizer`` with ``integrated_save=False``
  (its state is consolidated on rank 0 only);
* ``breakpoint``: FSDP2 with ``exception_save=True``, and the same exception on every rank
  in step 3 (a breakpoint would need every rank in a collective);
* ``zero-breakpoint``: the same with DDP + ``ZeroRedundancyOptimizer`` (its consolidation is a
  collective too).

Every rank writes ``--result`` (``{rank}`` replaced): per case, how the run ended (the
exception's type, message and notes) and what the monitor saved.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torpor

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "fsdp2.py"


def _example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fsdp2_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def run(case: str, directory: str) -> dict[str, object]:
    """One run of ``case``; how it ended."""
    net, opt, _ = _example().build("zero" if case.startswith("zero") else "fsdp2")
    torch.manual_seed(0)
    features = torch.randn(64, 16)
    data = TensorDataset(features, (features @ torch.randn(16, 4)).argmax(dim=1))
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, seed=0))
    options = {"trainable": {"save_trainable_params": True}, "saved-network": {"saved_network": net},
               "zero-unintegrated": {"integrated_save": False},
               "breakpoint": {"exception_save": True}, "zero-breakpoint": {"exception_save": True}}[case]
    monitor = torpor.CheckpointMonitor(directory=directory, save_checkpoint_steps=2, **options)
    outcome: dict[str, object] = {"error": None}
    try:
        with torpor.Loop(net, opt, callbacks=[torpor.OnRequestExit(directory=directory), monitor]) as loop:
            for _ in loop.epochs(1):
                for xb, yb in loop.batches(loader):
                    if case.endswith("breakpoint") and loop.args.cur_step_num == 3:
                        raise ValueError("loss is NaN")  # the same on every rank
                    opt.zero_grad()
                    nn.functional.cross_entropy(net(xb), yb).backward()
                    opt.step()
                    loop.step_end()
    except Exception as exc:
        outcome.update(error=type(exc).__name__, message=str(exc), notes=list(getattr(exc, "__notes__", [])))
    outcome["saved"] = monitor.saved
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True)
    parser.add_argument("--directory", required=True, help="each case writes to a directory of its name under it")
    parser.add_argument("--result", required=True)
    opts = parser.parse_args()

    torpor.init_distributed()
    outcomes = {case: run(case, str(Path(opts.directory) / case)) for case in opts.cases.split(",")}
    Path(opts.result.format(rank=dist.get_rank())).write_text(json.dumps(outcomes))


if __name__ == "__main__":
    main()
