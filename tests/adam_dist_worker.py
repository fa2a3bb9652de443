"""One rank of ElraAdam's DDP test (tests/test_adam_distributed.py starts two, gloo on loopback).

    python tests/adam_dist_worker.py RANK WORLD INIT_FILE OUT_DIR

Trains tests/dist_worker.py's network on its share of each global batch under
DistributedDataParallel with ``ElraAdam(param_groups(model))`` (the process group found by
itself) and saves the parameters and the outcome of every call to
``OUT_DIR/adam_ddp.rank<RANK>.pt`` (the process set-up is tests/dist_worker.py's).
Only rank 1 sees the events of :data:`EVENTS`; the single-process reference (:func:`single`,
computed by the test) sees them at the same steps.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from elra import ElraAdam  # noqa: E402
import dist_worker  # noqa: E402
from dist_worker import global_batches, make_data, make_model, param_groups  # noqa: E402

STEPS = 150
# rank 1 alone: a NaN loss value, a loss spike the guard rejects, a NaN input (a NaN loss and,
# after DDP's all-reduce, NaN gradients on every rank)
EVENTS = {40: "nan_loss", 80: "big_loss", 110: "nan_input"}


def run(model, opt, rank: int, world: int, events_here: bool):
    X, y = make_data()
    lf = torch.nn.CrossEntropyLoss()
    outcomes = []
    for i, idx in enumerate(global_batches(STEPS)):
        part = idx.chunk(world)[rank]
        event = EVENTS.get(i) if events_here else None
        xb = X[part].clone()
        if event == "nan_input":
            xb[0, 0] = math.nan
        opt.zero_grad()
        loss = lf(model(xb), y[part])
        loss.backward()
        opt.step({"nan_loss": math.nan, "big_loss": 1e6}.get(event, loss.item()))
        outcomes.append(opt.last_outcome)
    return outcomes


def single():
    """The reference: one process, the whole global batch, the same events."""
    model = make_model()
    opt = ElraAdam(param_groups(model), process_group=None)
    outcomes = run(model, opt, 0, 1, True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, outcomes


def scenario_ddp(rank, world, out):
    """DDP around the network, ElraAdam over its groups (the process group found by itself)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    opt = ElraAdam(param_groups(model))
    assert opt.process_group is not None
    outcomes = run(DDP(model), opt, rank, world, rank == 1)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "outcomes": outcomes, "engine": opt.engine_name}


if __name__ == "__main__":  # dist_worker's process set-up, this scenario
    dist_worker.SCENARIOS["adam_ddp"] = scenario_ddp
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist_worker.main(sys.argv[1:] + ["adam_ddp"])
