"""Example 5: ZeroRedundancyOptimizer around ElraOptimizer (2 CPU processes, gloo).

ZeRO gives each process's ElraOptimizer only a shard of the parameters (and of its state). ELRA's
step needs dot products and norms over *all* parameters, so tell it that it holds a shard:
``sharded=True``, passed through ZeRO's keyword arguments. Each rank then computes its partial
sums, the ranks add them up (one all-reduce of a few numbers per step), and every rank takes the
same step size. The losses are averaged as with plain DDP (example 4).

ZeRO forwards only ``step``: a retrace is ``zero.step(loss, retrace=True)``, and the other ELRA
methods are called on ``zero.optim`` (the local ElraOptimizer). Checkpoints go through ZeRO as
usual: ``consolidate_state_dict()`` on every rank, ``state_dict()`` on the receiving rank,
``load_state_dict()`` on every rank; ELRA's scalars travel inside.

    PYTHONPATH=. python examples/example5_zero.py --epochs 10
"""

import argparse
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch.distributed.optim import ZeroRedundancyOptimizer
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


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def make_zero(model: torch.nn.Module) -> ZeroRedundancyOptimizer:
    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ElraOptimizer,
                                   sharded=True,  # this rank's ElraOptimizer holds a shard
                                   lr=1e-4, regime="stochastic", warmup=10, classes=10,
                                   batch_size=GLOBAL_BATCH)


def worker(rank: int, world: int, tmp: str, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    X_train, y_train, X_test, y_test = load_data(args.seed)
    train_set = TensorDataset(X_train, y_train)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=args.seed)
    loader = DataLoader(train_set, batch_size=GLOBAL_BATCH // world, sampler=sampler)
    model = make_model(args.seed)
    ddp_model = DDP(model)
    zero = make_zero(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    mine = sum(p.numel() for g in zero.optim.param_groups for p in g["params"])
    print(f"rank {rank}: ElraOptimizer over {mine} of "
          f"{sum(p.numel() for p in model.parameters())} parameters "
          f"(sharded={zero.optim.sharded})", flush=True)

    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            zero.zero_grad()
            loss = loss_fn(ddp_model(xb), yb)
            loss.backward()
            zero.step(loss)  # ELRA steps its shard, ZeRO then shares the new parameters

    # checkpoint: gather the shards' states on rank 0 and save them ...
    path = os.path.join(tmp, "zero.pt")
    zero.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": zero.state_dict()}, path)
    dist.barrier()
    # ... and resume from it in fresh objects on every rank
    state = torch.load(path, weights_only=True)
    model2 = make_model(args.seed + 1)
    model2.load_state_dict(state["model"])
    DDP(model2)
    zero2 = make_zero(model2)
    zero2.load_state_dict(state["optimizer"])
    restored = zero2.optim.stats["steps"]  # what the restored optimizer holds (every rank)

    if rank == 0:
        with torch.no_grad():
            acc = (model(X_test).argmax(1) == y_test).float().mean().item()
        print(f"step length {zero.optim.param_groups[0]['lr']:.3g}; the checkpoint restored "
              f"{restored} steps")
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
        mp.spawn(worker, args=(args.processes, tmp, args), nprocs=args.processes)


if __name__ == "__main__":
    main()
