"""Example 3: half precision with ElraGradScaler.

``ElraGradScaler`` is used exactly like ``torch.amp.GradScaler``; swapping one for the other is the
only change to a mixed-precision loop. It also hands the loss value to ELRA (which needs it), folds
the division by the scale into the step, and turns an overflowing gradient into a retrace (the
step is undone and the scale backs off).

The model is a 64-128-10 MLP on scikit-learn's 8x8 digits (1400 training / 397 test images,
batch 32), built in the default dtype chosen by ``--dtype`` (float16 as in the seed text).

    PYTHONPATH=. python examples/example3_grad_scaler.py                   # float16
    PYTHONPATH=. python examples/example3_grad_scaler.py --dtype bfloat16
    PYTHONPATH=. python examples/example3_grad_scaler.py --half-loss       # see the scale back off

On CPU with torch 2.13 every op of this script runs in float16 (checked), but one thing needs
care: with float16 the cross-entropy at the start (about 2.3) times the initial scale 2**16 is
about 151000, above float16's largest value 65504, so the scaled loss is inf, its gradient NaN,
and the first step is a retrace (the scaler then halves the scale). That is handled correctly, but
it wastes steps, so by default the loss is computed in float32 from the half-precision logits
(as ``torch.autocast`` does for losses); the model, its gradients and the optimizer stay in the
chosen dtype. ``--half-loss`` keeps the loss in the model's dtype to show the back-off.
"""

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from elra import ElraGradScaler, ElraOptimizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16",
                        help="default dtype of model and data (default float16, as in the seed)")
    parser.add_argument("--half-loss", action="store_true",
                        help="compute the loss in --dtype too instead of float32")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, init and shuffling")
    args = parser.parse_args()

    dtype = DTYPES[args.dtype]
    torch.set_default_dtype(dtype)  # every tensor and module created from here on uses it
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # Data: features scaled to [0, 1] in the default dtype, labels as int64.
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=dtype) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(args.seed))
    X_train, y_train = X[perm[:1400]].to(device), y[perm[:1400]].to(device)
    X_test, y_test = X[perm[1400:]].to(device), y[perm[1400:]].to(device)
    data_loader = DataLoader(TensorDataset(X_train, y_train), batch_size=32, shuffle=True,
                             generator=torch.Generator().manual_seed(args.seed))

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10)).to(device)
    ce = torch.nn.CrossEntropyLoss()

    def loss_function(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ce(logits if args.half_loss else logits.float(), target)

    # As in the seed: warmup > 1 selects the stochastic (mini-batch) regime.
    optim = ElraOptimizer(model.parameters(), lr=1.0e-4, warmup=10)
    scaler = ElraGradScaler(init_scale=2.0**16, enabled=True)
    print(f"dtype {args.dtype}, loss in {'the model dtype' if args.half_loss else 'float32'}, "
          f"regime {optim.regime}, initial scale {scaler.get_scale():g}")

    print(f"{'epoch':>5} {'train loss':>10} {'test loss':>9} {'test acc':>8} {'retraces':>8} "
          f"{'scale':>7} {'step len':>8} {'time s':>6}")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        loss_sum, batches, retraces = 0.0, 0, 0
        for X_batch, y_batch in data_loader:
            optim.zero_grad()
            loss = loss_function(model(X_batch), y_batch)

            scaler.scale(loss).backward()  # backward of loss * scale
            scaler.step(optim)  # passes loss.item() and the scale to ELRA
            scaler.update()  # backs off after an overflow, grows after long clean runs

            loss_sum += loss.item()
            batches += 1
            retraces += optim.last_outcome.startswith("retrace")

        with torch.no_grad():
            logits = model(X_test)
            test_loss = ce(logits.float(), y_test).item()
            test_acc = (logits.argmax(1) == y_test).float().mean().item()
        print(f"{epoch:5d} {loss_sum / batches:10.4f} {test_loss:9.4f} {test_acc:8.4f} "
              f"{retraces:8d} {scaler.get_scale():7g} {optim.param_groups[0]['lr']:8.3g} "
              f"{time.perf_counter() - start:6.1f}")

    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"final scale {scaler.get_scale():g}; parameters in {model[0].weight.dtype}, "
          f"all finite: {finite}; test accuracy {test_acc:.4f}")


if __name__ == "__main__":
    main()
