"""Example 2: a complete mini-batch training loop with ElraOptimizer.

Trains a 64-128-10 MLP on scikit-learn's 8x8 digits (1400 training / 397 test images, batch 32;
the data ship with scikit-learn, so this runs offline) and shows every optional part of the ELRA
API in a training loop:

* the reference's positional order ``ElraOptimizer(params, model, batch_size, classes, lr=...,
  weight_decay=...)``; ``classes > 1`` selects the stochastic (mini-batch) regime,
* ``add_param_group`` for a group with its own weight decay (here: biases without decay),
* a loss limit: a mini-batch loss that is not below it is declared a failed step with
  ``step_retrace(loss)``, and its ``backward()`` is skipped,
* ``set_valid_loss``/``set_train_loss`` once per epoch for the dynamic weight decay,
* boosting: ``get_boost_model`` returns a copy of the model at the average of the recent
  accepted points, for evaluation only (it never changes the optimizer's path).

    PYTHONPATH=. python examples/example2_training_loop.py
    PYTHONPATH=. python examples/example2_training_loop.py --epochs 20 --seed 1
"""

import argparse
import math

import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from elra import ElraOptimizer


def load_data(seed: int):
    """The digits as float features in [0, 1], split 1400 / 397 by a seeded permutation."""
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:1400], perm[1400:]
    return X[train], y[train], X[test], y[test]


@torch.no_grad()
def evaluate(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, loss_func):
    """(loss, accuracy) of ``model`` on the whole set at once."""
    model.eval()
    out = model(X)
    model.train()
    return loss_func(out, y).item(), (out.argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, init and shuffling")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    X_train, y_train, X_test, y_test = load_data(args.seed)
    X_train, y_train = X_train.to(device), y_train.to(device)
    X_test, y_test = X_test.to(device), y_test.to(device)

    batch_size, num_classes = 32, 10
    lr, wdecay = 1e-5, 0.99999  # weight decay given as a keep factor: 0.99999 means 1e-5

    data_loader = DataLoader(TensorDataset(X_train, y_train), batch_size=batch_size, shuffle=True,
                             generator=torch.Generator().manual_seed(args.seed))
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, num_classes)).to(device)
    loss_func = torch.nn.CrossEntropyLoss()

    # A parameter may belong to one group only, so the first group gets the weight matrices and
    # the biases follow in a group of their own, without weight decay. (With a single group,
    # pass model.parameters() here and leave out add_param_group.)
    weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    optim = ElraOptimizer(weights, None, batch_size, num_classes, lr=lr, weight_decay=wdecay)
    optim.add_param_group({"params": biases, "weight_decay": 0.0})
    groups = ", ".join(f"{len(g['params'])} tensors with weight decay {g['weight_decay']:.3g}"
                       for g in optim.param_groups)
    print(f"regime: {optim.regime}; groups: {groups}")

    # A mini-batch loss at or above this limit counts as a failed step (also catches NaN).
    initial_loss, _ = evaluate(model, X_train, y_train, loss_func)
    loss_limit = initial_loss * 1.5
    print(f"initial train loss {initial_loss:.4f}, loss limit {loss_limit:.4f}")

    optim.get_boost_model(True, model, None)  # turn boosting on (returns no model yet)

    print(f"{'epoch':>5} {'train loss':>10} {'test loss':>9} {'test acc':>8} "
          f"{'boost acc':>9} {'boost pts':>9} {'retraces':>8} {'step len':>8}")
    for epoch in range(1, args.epochs + 1):
        retraces, loss_sum, batches = 0, 0.0, 0
        for X, y in data_loader:
            optim.zero_grad(set_to_none=True)
            loss = loss_func(model(X), y)
            loss_item = loss.item()
            loss_sum += loss_item
            batches += 1

            if not loss_item < loss_limit:  # also true for NaN
                optim.step_retrace(loss_item)  # back to the last good point, no gradient needed
                retraces += 1
                continue  # skip backward() for this failed step

            loss.backward()
            optim.step(loss_item)  # ELRA needs the loss value
            retraces += optim.last_outcome.startswith("retrace")

        # Once per epoch: feed the dynamic weight decay. Here the test set doubles as validation
        # set to keep the example short; a real project would hold out a separate split.
        train_loss, _ = evaluate(model, X_train, y_train, loss_func)
        test_loss, test_acc = evaluate(model, X_test, y_test, loss_func)
        optim.set_train_loss(train_loss)
        optim.set_valid_loss(test_loss)

        # Boosting: the average of this epoch's accepted points (the average restarts with
        # every call that returns a model). For evaluation only.
        cnt, avg_loss, model2 = optim.get_boost_model(True, model, device=None)
        boost_acc = evaluate(model2, X_test, y_test, loss_func)[1] if model2 is not None else math.nan

        print(f"{epoch:5d} {loss_sum / batches:10.4f} {test_loss:9.4f} {test_acc:8.4f} "
              f"{boost_acc:9.4f} {cnt:9d} {retraces:8d} {optim.param_groups[0]['lr']:8.3g}")

    # The last epoch's boosted model (model2 above), evaluated on both sets.
    if model2 is not None:
        b_train_loss, b_train_acc = evaluate(model2, X_train, y_train, loss_func)
        b_test_loss, b_test_acc = evaluate(model2, X_test, y_test, loss_func)
        print(f"final model:   train loss {train_loss:.4f}, test loss {test_loss:.4f}, "
              f"test accuracy {test_acc:.4f}")
        print(f"boosted model: train loss {b_train_loss:.4f}, test loss {b_test_loss:.4f}, "
              f"test accuracy {b_test_acc:.4f} (average of {cnt} points, their mean mini-batch "
              f"loss {avg_loss:.4f})")


if __name__ == "__main__":
    main()
