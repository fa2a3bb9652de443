"""Example 8: Hugging Face accelerate with ElraOptimizer (a loop that calls a bare ``step()``).

Loops written for accelerate (and Trainer-style loops) call ``optimizer.step()`` without
arguments. ELRA decides from the loss whether a step succeeded, so hand it the loss first:
``opt.set_loss(loss)`` on the ElraOptimizer you created (accelerate's wrapper does not forward
it), then the usual ``optimizer.step()``. Without any loss ELRA still trains, without its
loss-based decisions (it says so once in the ``elra`` log).

With gradient accumulation (``--accumulate k``) accelerate calls ELRA's step only every k
micro-batches; ``set_loss`` on every micro-batch gives that step the mean of their losses. ELRA's
own gradient collection (``collects``, which it may grow by itself) comes on top: a parameter
update every k * collects micro-batches.

    PYTHONPATH=. python examples/example8_accelerate.py --epochs 10
    PYTHONPATH=. python examples/example8_accelerate.py --epochs 10 --accumulate 2
"""

import argparse

import torch
from accelerate import Accelerator
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from elra import ElraOptimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="accelerate's gradient_accumulation_steps (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, init and shuffling")
    args = parser.parse_args()

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(args.seed))
    X_train, y_train, X_test, y_test = X[perm[:1400]], y[perm[:1400]], X[perm[1400:]], y[perm[1400:]]
    loader = DataLoader(TensorDataset(X_train, y_train), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accumulate)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    elra_opt = ElraOptimizer(model.parameters(), lr=1e-4, regime="stochastic", warmup=10,
                             classes=10, batch_size=32 * args.accumulate)
    model, optimizer, loader = accelerator.prepare(model, elra_opt, loader)

    updates = 0
    for epoch in range(1, args.epochs + 1):
        for xb, yb in loader:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                accelerator.backward(loss)
                elra_opt.set_loss(loss)  # the loss for the next (bare) step
                optimizer.step()  # accelerate calls ELRA only when the gradients are complete
                optimizer.zero_grad()
            updates += accelerator.sync_gradients

    with torch.no_grad():
        acc = (model(X_test).argmax(1) == y_test).float().mean().item()
    print(f"accumulation {args.accumulate}: {updates} calls of ELRA's step, step length "
          f"{elra_opt.param_groups[0]['lr']:.3g}")
    print(f"test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
