"""Example 7: PyTorch Lightning with ElraOptimizer.

``configure_optimizers`` returns an ElraOptimizer; nothing else changes. With automatic
optimization Lightning calls ``optimizer.step(closure=...)``, and ELRA takes the loss from the
closure's result. ``precision="bf16-mixed"`` works too (the parameters and ELRA stay float32).
``param_groups[0]["lr"]`` holds the step length ELRA applies, so Lightning's
``LearningRateMonitor`` logs ELRA's own step (here into a CSV file in a temporary directory).

    PYTHONPATH=. python examples/example7_lightning.py --epochs 10
    PYTHONPATH=. python examples/example7_lightning.py --epochs 10 --precision bf16-mixed
"""

import argparse
import csv
import glob
import os
import tempfile
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from elra import ElraOptimizer


class DigitsClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                       torch.nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return ElraOptimizer(self.parameters(), lr=1e-4, regime="stochastic", warmup=10,
                             classes=10, batch_size=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--seed", type=int, default=0, help="seed of split, init and shuffling")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers")

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(args.seed))
    X_train, y_train, X_test, y_test = X[perm[:1400]], y[perm[:1400]], X[perm[1400:]], y[perm[1400:]]
    loader = DataLoader(TensorDataset(X_train, y_train), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))

    torch.manual_seed(args.seed)
    module = DigitsClassifier()
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs,
                             precision=args.precision, logger=CSVLogger(logs),
                             callbacks=[LearningRateMonitor(logging_interval="step")],
                             log_every_n_steps=10, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_dataloaders=loader)
        with open(glob.glob(os.path.join(logs, "**", "metrics.csv"), recursive=True)[0]) as fh:
            logged = [float(row["lr-ElraOptimizer"]) for row in csv.DictReader(fh)
                      if row.get("lr-ElraOptimizer")]

    with torch.no_grad():
        acc = (module.net(X_test).argmax(1) == y_test).float().mean().item()
    print(f"precision {args.precision}: {trainer.optimizers[0].regime} regime, "
          f"{len(logged)} step lengths logged by LearningRateMonitor, the last ones "
          f"{', '.join(f'{v:.3g}' for v in logged[-3:])}")
    print(f"test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
