"""Example 6: FSDP2 (fully_shard) with ElraOptimizer (2 CPU processes, gloo, CPU device mesh).

``fully_shard`` turns every parameter into a DTensor of which each process holds a shard (a
block of rows; shards may be uneven or empty). ElraOptimizer sees the DTensors, works on the
local shards and sums its dot products and norms over the mesh; nothing to configure
(``sharded`` is detected). Optimizer state saves and loads with
``torch.distributed.checkpoint`` like any other optimizer's.

    PYTHONPATH=. python examples/example6_fsdp2.py --epochs 10
"""

import argparse
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from elra import ElraOptimizer

GLOBAL_BATCH = 32


def load_data(seed: int):
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    return X[perm[:1400]], y[perm[:1400]], X[perm[1400:]], y[perm[1400:]]


def make(seed: int, mesh):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = ElraOptimizer(model.parameters(), lr=1e-4, regime="stochastic", warmup=10,
                              classes=10, batch_size=GLOBAL_BATCH)
    return model, optimizer


def worker(rank: int, world: int, tmp: str, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    X_train, y_train, X_test, y_test = load_data(args.seed)
    model, optimizer = make(args.seed, mesh)
    shards = [tuple(p.to_local().shape) for p in model.parameters()]
    print(f"rank {rank}: local shards {shards}, sharded={optimizer.sharded}", flush=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(args.seed)

    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(X_train), generator=order)  # the same order on every rank
        for i in range(0, len(X_train), GLOBAL_BATCH):
            idx = perm[i:i + GLOBAL_BATCH].chunk(world)[rank]  # this rank's share of the batch
            optimizer.zero_grad()
            loss = loss_fn(model(X_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step(loss)

    # checkpoint with torch.distributed.checkpoint (every rank writes its shards) ...
    ckpt = os.path.join(tmp, "checkpoint")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=ckpt)
    # ... and load it into a fresh model and optimizer
    model2, optimizer2 = make(args.seed + 1, mesh)
    model_sd2, optim_sd2 = get_state_dict(model2, optimizer2)
    state = {"model": model_sd2, "optimizer": optim_sd2}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model2, optimizer2, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    same = all(torch.equal(a.to_local(), b.to_local())
               for a, b in zip(model.parameters(), model2.parameters()))

    with torch.no_grad():
        acc = (model(X_test).argmax(1) == y_test).float().mean().item()  # a collective
    if rank == 0:
        restored = optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        print(f"step length {optimizer.param_groups[0]['lr']:.3g}; restored from the "
              f"checkpoint: parameters equal {same}, step length equal {restored}")
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
