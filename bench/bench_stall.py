#!/usr/bin/env python3
"""Training stall per checkpoint: ``async_save=True`` vs a synchronous save of the same state.

A plain-loop run whose model holds ``--size-mib`` of parameters (plus SGD momentum of the
same size would double it, so plain SGD), a step of ``--step-ms`` of work that changes the
weights in place, and a save every ``--every`` steps to MinIO. The stall is what
``CheckpointMonitor.stalls`` records: the time the step boundary blocked training (the whole
save when synchronous; the snapshot copy plus any wait for the previous upload when async).
Saves are spaced so an upload can finish before the next one is due, as in real runs.
"""

from __future__ import annotations

import time

from _common import MIB, load_note, median, minio, parser


def main() -> None:
    p = parser(__doc__.splitlines()[0], size_mib=1024)
    p.add_argument("--saves", type=int, default=5, help="checkpoints per side (default 5; the median is reported)")
    p.add_argument("--every", type=int, default=60, help="steps between saves (default 60)")
    p.add_argument("--step-ms", type=float, default=200.0, help="time per training step in ms (default 200)")
    opts = p.parse_args()

    import torch
    from torch import nn

    import torpor

    class Big(nn.Module):
        def __init__(self, size_mib: int) -> None:
            super().__init__()
            n = size_mib * MIB // 4 // 64
            self.blocks = nn.ParameterList([nn.Parameter(torch.randn(n)) for _ in range(64)])

    def run(async_save: bool, uri: str) -> list[float]:
        net = Big(opts.size_mib)
        monitor = torpor.CheckpointMonitor(directory=uri, save_checkpoint_steps=opts.every, keep_checkpoint_max=2,
                                           async_save=async_save, save_network_params=False)
        steps = opts.every * opts.saves
        with torpor.Loop(net, None, callbacks=[monitor]) as loop:
            for _ in loop.epochs(1):
                for step in loop.batches(range(steps)):
                    with torch.no_grad():
                        net.blocks[step % 64].mul_(0.999)  # the optimizer's in-place update
                    time.sleep(opts.step_ms / 1000)  # the rest of the step (GPU time, data loading)
                    loop.step_end(torch.tensor(0.0))
        monitor.wait()
        assert not monitor.save_errors, monitor.save_errors
        return monitor.stalls[: opts.saves]

    print(f"[stall] state {opts.size_mib} MiB, save every {opts.every} steps of {opts.step_ms:.0f} ms; "
          f"{load_note()}", flush=True)
    with minio(on_disk=opts.minio_on_disk) as bucket:
        sync = run(False, f"s3://{bucket}/sync")
        print(f"[stall] synchronous stalls: {', '.join(f'{s:.2f}' for s in sync)} s", flush=True)
        asyn = run(True, f"s3://{bucket}/async")
        print(f"[stall] async stalls:       {', '.join(f'{s:.3f}' for s in asyn)} s", flush=True)
    print(f"RATIO stall async/sync = {median(asyn) / median(sync):.3f}x (target <= 0.1x; median "
          f"{median(asyn):.3f} s vs {median(sync):.2f} s per checkpoint)")


if __name__ == "__main__":
    main()
