"""Example 1: fit sin(x) on [-pi, pi] by a cubic polynomial with ElraOptimizer.

This is the polynomial-fit example of the PyTorch tutorials ("PyTorch: optim") with the optimizer
swapped for ELRA. The whole data set (2000 points) is one batch, so the problem is deterministic
and we ask for the deterministic (full-batch) regime explicitly. The only change a user of
``torch.optim`` must make is to pass the loss value to ``step``: ELRA decides from it whether the
last step succeeded.

    PYTHONPATH=. python examples/example1_polynomial.py            # 20 steps as in the seed
    PYTHONPATH=. python examples/example1_polynomial.py --steps 200
"""

import argparse
import math

import torch

from elra import ElraOptimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initial weights")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    # Inputs and targets: 2000 points of sin(x) on [-pi, pi].
    x = torch.linspace(-math.pi, math.pi, 2000)
    y = torch.sin(x)

    # Features (x, x^2, x^3): a linear layer on them is a cubic polynomial.
    powers = torch.tensor([1, 2, 3])
    features = x.unsqueeze(-1).pow(powers)

    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0, 1))
    loss_fn = torch.nn.MSELoss(reduction="sum")

    # lr is only the length of the very first step; ELRA grows (or shrinks) it by itself.
    learning_rate = 1e-6
    optimizer = ElraOptimizer(model.parameters(), model=model, lr=learning_rate,
                              regime="deterministic")

    # Each call reports the loss at the current point and what ELRA did with it. A call whose loss is far above the recent losses is a failed step: ELRA then goes back to
    # the last accepted point (a "retrace", shown as last_outcome) and tries a shorter step.
    every = max(1, args.steps // 20)
    for t in range(args.steps):
        y_pred = model(features)
        loss = loss_fn(y_pred, y)
        loss_val = loss.item()

        # Gradients accumulate in .grad, so clear them before each backward pass.
        optimizer.zero_grad()
        loss.backward()
        # Unlike torch.optim optimizers, ELRA needs this step's loss value.
        optimizer.step(loss_val)
        if t % every == 0 or t == args.steps - 1:
            print(f"call {t + 1:4d}  loss {loss_val:12.6g}  {optimizer.last_outcome:>17}  "
                  f"next step length {optimizer.param_groups[0]['lr']:.3g}")

    linear = model[0]
    print(f"Result: y = {linear.bias.item()} + {linear.weight[:, 0].item()} x + "
          f"{linear.weight[:, 1].item()} x^2 + {linear.weight[:, 2].item()} x^3")


if __name__ == "__main__":
    main()
