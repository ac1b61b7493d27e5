"""The seed's MindSpore example (``OnRequestExit`` with LeNet-5), in PyTorch with torpor.

Send SIGTERM (or write ``{"GracefulExit": 1}`` to a ``config_file``) while it trains: it
finishes the current step, saves ``./checkpoints/rank_0/LeNet5-{epoch}_{step}.ckpt`` (then its
``.pt2``) and stops: a name per save, so a second stop never rewrites the first one's checkpoint.
(The seed writes ``./rank_0/LeNet5.ckpt``; torpor's default is the run's checkpoint root.)

    python examples/lenet.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torpor


class LeNet5(nn.Module):
    """LeNet-5 for 1x32x32 inputs and 10 classes, as in MindSpore's lenet.py."""

    def __init__(self, num_class: int = 10, num_channel: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(num_channel, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_class),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def create_dataset(samples: int = 2048, batch_size: int = 32) -> DataLoader:
    """MNIST-shaped synthetic data (no download): 1x32x32 images, 10 classes."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, 1, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (samples,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True)


class PrintProgress(torpor.Callback):
    """Prints each step's loss, like MindSpore's LossMonitor."""

    def on_train_step_end(self, run_context: torpor.RunContext) -> None:
        args = run_context.original_args()
        print(f"epoch {args.cur_epoch_num} step {args.cur_step_num} loss {float(args.net_outputs):.4f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    opts = parser.parse_args()

    # The seed's example, line for line:
    net = LeNet5()
    loss = nn.CrossEntropyLoss()  # nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction='mean')
    optim = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)  # nn.Momentum(..., 0.01, 0.9)
    model = torpor.Model(net, loss_fn=loss, optimizer=optim)
    dataset = create_dataset()
    on_request_exit = torpor.OnRequestExit(file_name="LeNet5")
    model.train(opts.epochs, dataset, callbacks=[on_request_exit, PrintProgress()])
