"""One rank of the distributed tests (tests/test_distributed.py starts two, gloo on loopback).

    python tests/dist_worker.py RANK WORLD INIT_FILE OUT_DIR SCENARIO [SCENARIO ...]

Each scenario trains the small network of :func:`make_model` on the batches of
:func:`global_batches` (each rank takes its share of every global batch) and saves what the test
compares to ``OUT_DIR/<scenario>.rank<RANK>.pt``; an exception is saved as text to
``OUT_DIR/<scenario>.rank<RANK>.err`` and ends the process (the other rank then fails on its
next collective or runs into the test's time limit). The single-process references are computed
by the test itself with the same functions.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elra import ElraOptimizer  # noqa: E402

FEATURES, HIDDEN, CLASSES = 20, 33, 5  # 33 and 5 rows shard unevenly over two ranks
SAMPLES, GLOBAL_BATCH = 512, 64
STEPS = 100  # sharded runs (ZeRO, FSDP2) and their checkpoint resumes
RESUME_AT = 50
DDP_STEPS = 200
RANK1_RETRACES = (37, 111)  # DDP: rank 1 calls step_retrace at these steps, the other rank step
RANK1_NAN = (150,)  # ... and passes a NaN loss at these
# sharded runs: events on the last rank only (the single-process reference has them too):
# step_retrace, and a NaN in one element of that rank's gradient shard
SHARD_EVENTS = {30: "retrace", 70: "nan_gradient"}


class Net(torch.nn.Module):
    """20-33-5 MLP with a scalar output scale: under FSDP2 on two ranks the weights shard
    17/16 and 3/2 rows, and the scale (one element) leaves rank 1 an empty shard."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(FEATURES, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, CLASSES)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def make_data(seed: int = 1):
    """A learnable classification set: labels from a random teacher network."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(SAMPLES, FEATURES, generator=g)
    teacher = torch.randn(FEATURES, CLASSES, generator=g)
    y = (X @ teacher + 0.5 * torch.randn(SAMPLES, CLASSES, generator=g)).argmax(1)
    return X, y


def global_batches(steps: int, seed: int = 2):
    """Index tensors of ``steps`` global batches (shuffled epochs of the data set)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(SAMPLES, generator=g)
        out += [perm[i:i + GLOBAL_BATCH] for i in range(0, SAMPLES, GLOBAL_BATCH)]
    return out[:steps]


def param_groups(model: torch.nn.Module):
    """Weights decayed, biases and the scale not: two groups, so per-group sums are exercised."""
    decayed = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": decayed, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}]


OPT_KW = dict(lr=1e-4, regime="stochastic", warmup=10, classes=CLASSES)


def train(model, step_fn, batches, X, y, rank: int = 0, world: int = 1, start: int = 0):
    """Run ``step_fn(loss, step_index)`` on this rank's share of each global batch."""
    lf = torch.nn.CrossEntropyLoss()
    for i, idx in enumerate(batches[start:], start):
        part = idx.chunk(world)[rank]
        loss = lf(model(X[part]), y[part])
        loss.backward()
        step_fn(loss, i)


def event_step(opt, poison, events_here: bool, outcomes: list):
    """A step function that plays SHARD_EVENTS (where ``events_here``) and records outcomes;
    ``poison()`` puts a NaN into a gradient element this process optimizes. ``opt`` may be a
    ZeroRedundancyOptimizer, which forwards only ``step``: the retrace goes as
    ``step(loss, retrace=True)`` there."""
    elra = getattr(opt, "optim", opt)

    def step(loss, i):
        event = SHARD_EVENTS.get(i) if events_here else None
        if event == "retrace":
            if opt is elra:
                opt.step_retrace(loss)
            else:
                opt.step(loss, retrace=True)
        else:
            if event == "nan_gradient":
                poison()
            opt.step(loss)
        outcomes.append(elra.last_outcome)
        opt.zero_grad()
    return step


def single_process(engine: str, steps: int = STEPS, **extra):
    """The reference: one process, the whole global batch per step, the same events."""
    X, y = make_data()
    model = make_model()
    opt = ElraOptimizer(param_groups(model), engine=engine, process_group=None,
                        **{**OPT_KW, **extra})
    outcomes: list = []

    def poison():
        model.fc1.weight.grad.view(-1)[0] = float("nan")

    train(model, event_step(opt, poison, True, outcomes), global_batches(steps), X, y)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, outcomes, opt


# --- scenarios ---------------------------------------------------------------------------------------
def scenario_ddp(rank, world, out, engine, group="auto", bucket_view=False):
    """DDP; rank 1 alone forces retraces (step_retrace) and passes a NaN loss.
    ``bucket_view``: DDP's gradient_as_bucket_view=True (ELRA copies the gradients in)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    X, y = make_data()
    model = make_model()
    ddp = DDP(model, gradient_as_bucket_view=bucket_view)
    kw = dict(OPT_KW)
    if group is None:
        kw["process_group"] = None
    opt = ElraOptimizer(model.parameters(), engine=engine, **kw)
    outcomes = []

    def step(loss, i):
        if rank == 1 and i in RANK1_RETRACES:
            opt.step_retrace(loss)
        elif rank == 1 and i in RANK1_NAN:
            opt.step(float("nan"))
        else:
            opt.step(loss)
        outcomes.append(opt.last_outcome)
        opt.zero_grad()

    train(ddp, step, global_batches(DDP_STEPS), X, y, rank, world)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "outcomes": outcomes, "retraces": opt.stats["retraces"],
            "lr": opt.param_groups[0]["lr"], "engine": opt.engine_name}


def _zero(model, engine, extra):
    """ZeRO around ElraOptimizer; with ``group`` in ``extra`` both use that process group (ZeRO
    keeps its own ``process_group`` argument, so ELRA's comes through functools.partial)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    extra = dict(extra)
    group = extra.pop("group", None)
    if group is None:
        return ZeroRedundancyOptimizer(param_groups(model), optimizer_class=ElraOptimizer,
                                       engine=engine, sharded=True, **{**OPT_KW, **extra})
    return ZeroRedundancyOptimizer(
        param_groups(model), optimizer_class=functools.partial(ElraOptimizer, process_group=group),
        process_group=group, engine=engine, sharded=True, **{**OPT_KW, **extra})


def _zero_poison(zero):
    def poison():
        first = next(p for g in zero.optim.param_groups for p in g["params"] if p.requires_grad)
        first.grad.view(-1)[0] = float("nan")
    return poison


def scenario_zero(rank, world, out, engine, **extra):
    """ZeRO over DDP-averaged gradients, with SHARD_EVENTS on the last rank; a consolidated
    checkpoint at RESUME_AT, then a resume from it in new objects."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    X, y = make_data()
    batches = global_batches(STEPS)
    model = make_model()
    ddp = DDP(model)
    zero = _zero(model, engine, extra)
    ckpt = Path(out) / f"zero-{engine}.pt"
    outcomes: list = []
    play = event_step(zero, _zero_poison(zero), rank == world - 1, outcomes)

    def step(loss, i):
        play(loss, i)
        if i + 1 == RESUME_AT:
            zero.consolidate_state_dict(to=0)
            if rank == 0:
                torch.save({"model": model.state_dict(), "optim": zero.state_dict()}, ckpt)
            dist.barrier()

    train(ddp, step, batches, X, y, rank, world)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    local = zero.optim
    info = {"sharded": local.sharded, "engine": local.engine_name,
            "local_numel": sum(p.numel() for g in local.param_groups for p in g["params"]
                               if p.requires_grad),
            "own_group": local.process_group is not torch.distributed.group.WORLD}

    state = torch.load(ckpt, weights_only=True)
    model2 = make_model(seed=123)
    model2.load_state_dict(state["model"])
    ddp2 = DDP(model2)
    zero2 = _zero(model2, engine, extra)
    zero2.load_state_dict(state["optim"])
    zero2.consolidate_state_dict(to=0)  # right after loading (ELRA takes the load over here)
    outcomes2: list = []
    train(ddp2, event_step(zero2, _zero_poison(zero2), rank == world - 1, outcomes2), batches,
          X, y, rank, world, start=RESUME_AT)
    resumed = {n: p.detach().clone() for n, p in model2.named_parameters()}
    # a checkpoint of the resumed run holds its current scalars, not the loaded ones
    zero2.consolidate_state_dict(to=0)
    again = zero2.state_dict()["param_groups"][0]["elra"]["control"] if rank == 0 else None
    info["checkpoint_steps"] = (again["steps"] if again else None, zero2.optim.stats["steps"],
                                state["optim"]["param_groups"][0]["elra"]["control"]["steps"])
    return {"params": final, "resumed": resumed, "info": info, "outcomes": outcomes,
            "outcomes_resumed": outcomes2}


def _fsdp(engine, extra):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    model = make_model()
    fully_shard(model.fc1, mesh=mesh)
    fully_shard(model.fc2, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = ElraOptimizer(param_groups(model), engine=engine, **{**OPT_KW, **extra})

    def poison():
        model.fc1.weight.grad.to_local().view(-1)[0] = float("nan")
    return model, opt, poison


def scenario_fsdp(rank, world, out, engine, **extra):
    """FSDP2 (fully_shard, DTensor parameters, uneven and empty shards), with SHARD_EVENTS on
    the last rank; a torch.distributed.checkpoint save at RESUME_AT, then a resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    X, y = make_data()
    batches = global_batches(STEPS)
    model, opt, poison = _fsdp(engine, extra)
    ckpt = str(Path(out) / f"fsdp-{engine}")
    outcomes: list = []
    play = event_step(opt, poison, rank == world - 1, outcomes)

    def step(loss, i):
        play(loss, i)
        if i + 1 == RESUME_AT:
            dcp.save({"model": get_model_state_dict(model),
                      "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)

    train(model, step, batches, X, y, rank, world)
    final = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    info = {"sharded": opt.sharded, "engine": opt.engine_name,
            "local_numel": [p.to_local().numel() for p in model.parameters()]}

    torch.manual_seed(99)
    model2, opt2, poison2 = _fsdp(engine, extra)
    with torch.no_grad():  # the resumed model starts elsewhere: all must come from the checkpoint
        for p in model2.parameters():
            p.to_local().normal_()
    sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model2, sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    outcomes2: list = []
    train(model2, event_step(opt2, poison2, rank == world - 1, outcomes2), batches, X, y, rank,
          world, start=RESUME_AT)
    resumed = {n: p.full_tensor().detach().clone() for n, p in model2.named_parameters()}
    return {"params": final, "resumed": resumed, "info": info, "outcomes": outcomes,
            "outcomes_resumed": outcomes2}


def scenario_zero_mistakes(rank, world, out):
    """What a wrong set-up gets: ZeRO without sharded=True raises at the first step (on every
    rank, after one check of the shards), and a ZeRO state without ELRA's scalars raises."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    X, y = make_data()
    model = make_model()
    ddp = DDP(model)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    zero = ZeroRedundancyOptimizer(param_groups(model), optimizer_class=ElraOptimizer, **OPT_KW)
    result = {}
    try:
        train(ddp, lambda loss, i: zero.step(loss), global_batches(1), X, y, rank, world)
    except RuntimeError as e:
        result["unsharded"] = str(e)
    zero = _zero(model, "native", {})
    train(ddp, lambda loss, i: (zero.step(loss), zero.zero_grad()), global_batches(3), X, y,
          rank, world)
    zero.consolidate_state_dict(to=0)
    state = [zero.state_dict() if rank == 0 else None]
    torch.distributed.broadcast_object_list(state, src=0)
    stripped = state[0]
    for g in stripped["param_groups"]:
        del g["elra"]
    zero.load_state_dict(stripped)
    try:
        zero.optim.state_dict()
    except RuntimeError as e:
        result["stripped"] = str(e)
    return result


COLLECT = dict(collects=2, momentum=0.5)  # gradient collection and momentum on shards

SCENARIOS = {
    "ddp_native": lambda r, w, o: scenario_ddp(r, w, o, "native"),
    "ddp_torch": lambda r, w, o: scenario_ddp(r, w, o, "torch", bucket_view=True),
    "ddp_alone": lambda r, w, o: scenario_ddp(r, w, o, "native", group=None),
    "zero_native": lambda r, w, o: scenario_zero(r, w, o, "native"),
    "zero_torch": lambda r, w, o: scenario_zero(  # in a process group of its own
        r, w, o, "torch", group=torch.distributed.new_group(list(range(w)))),
    "zero_native_collect": lambda r, w, o: scenario_zero(r, w, o, "native", **COLLECT),
    "zero_mistakes": scenario_zero_mistakes,
    "fsdp_native": lambda r, w, o: scenario_fsdp(r, w, o, "native"),
    "fsdp_torch": lambda r, w, o: scenario_fsdp(r, w, o, "torch"),
    "fsdp_torch_collect": lambda r, w, o: scenario_fsdp(r, w, o, "torch", **COLLECT),
}


def main(argv):
    import torch.distributed as dist

    rank, world, init_file, out = int(argv[0]), int(argv[1]), argv[2], argv[3]
    torch.set_num_threads(1)
    # a rank whose partner died fails within a minute instead of waiting 30
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for name in argv[4:]:
            try:
                result = SCENARIOS[name](rank, world, out)
            except Exception:
                Path(out, f"{name}.rank{rank}.err").write_text(traceback.format_exc())
                raise
            torch.save(result, Path(out, f"{name}.rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main(sys.argv[1:])
