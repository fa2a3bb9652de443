"""Example 4: data-parallel training with DistributedDataParallel (2 CPU processes, gloo).

Each process trains the same 64-128-10 MLP on its half of every batch of scikit-learn's 8x8
digits (global batch 32). DDP averages the gradients; ElraOptimizer averages the losses over the
world group (its ``process_group`` defaults to it once ``torch.distributed`` is initialised), so
every process takes the same accept/retrace decisions and bit-identical steps. Everything that
feeds ELRA's control law is averaged the same way: the step losses, ``step_retrace`` (a retrace
asked for on one rank is a retrace on all), and ``set_valid_loss`` / ``set_train_loss``.

    PYTHONPATH=. python examples/example4_ddp.py --epochs 10
"""

import argparse
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from elra import ElraOptimizer

GLOBAL_BATCH = 32


def load_data(seed: int):
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    return X[perm[:1400]], y[perm[:1400]], X[perm[1400:]], y[perm[1400:]]


def worker(rank: int, world: int, init_file: str, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    X_train, y_train, X_test, y_test = load_data(args.seed)
    train_set = TensorDataset(X_train, y_train)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=args.seed)
    loader = DataLoader(train_set, batch_size=GLOBAL_BATCH // world, sampler=sampler)

    torch.manual_seed(args.seed)  # (DDP copies rank 0's parameters to the others anyway)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    ddp_model = DDP(model)
    optimizer = ElraOptimizer(model.parameters(), lr=1e-4, regime="stochastic", warmup=10,
                              classes=10, batch_size=GLOBAL_BATCH)
    loss_fn = torch.nn.CrossEntropyLoss()

    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(ddp_model(xb), yb)
            loss.backward()  # DDP averages the gradients here
            optimizer.step(loss)  # ELRA averages the losses here (one small all-reduce)
        with torch.no_grad():  # each rank reports its own share; ELRA uses their mean
            optimizer.set_train_loss(loss_fn(model(X_train[rank::world]), y_train[rank::world]))
            optimizer.set_valid_loss(loss_fn(model(X_test[rank::world]), y_test[rank::world]))

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    if rank == 0:
        with torch.no_grad():
            acc = (model(X_test).argmax(1) == y_test).float().mean().item()
        print(f"{world} processes, {args.epochs} epochs: step length "
              f"{optimizer.param_groups[0]['lr']:.3g}, process group of "
              f"{dist.get_world_size(optimizer.process_group)}")
        print(f"parameters bitwise equal on all ranks: "
              f"{all(torch.equal(copies[0], c) for c in copies)}")
        print(f"test accuracy {acc:.4f}")
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, init and shuffling")
    parser.add_argument("--processes", type=int, default=2, help="number of processes (2)")
    args = parser.parse_args()
    if "lo" in {name for _, name in socket.if_nameindex()}:  # stay on the loopback interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.processes, os.path.join(tmp, "init"), args),
                 nprocs=args.processes)


if __name__ == "__main__":
    main()
