"""ELRA across the ranks of a ``torch.distributed`` process group.

ELRA's step depends on two kinds of global quantities that data-parallel training splits over
processes, and this module is the one place that puts them back together:

* **Losses** (every rank sees its own mini-batch): the accept/retrace decision and the loss
  statistics must come from the same numbers on every rank, or the ranks part ways.
  :class:`LossAgreement` averages the loss of a call over the group, together with the flags
  that must be decided jointly ("some rank asked for a retrace", "no rank has a gradient") and
  the validation/training losses recorded since the last call, in one all-reduce of a few
  float64 numbers per call. With gradients averaged by ``DistributedDataParallel`` all ranks
  then take bit-identical steps.
* **Reductions over sharded parameters** (``ZeroRedundancyOptimizer``: each rank's optimizer
  holds a subset of the parameters; FSDP2 ``fully_shard``: each parameter is a ``DTensor`` whose
  local shard may be uneven or empty): the dot products and norms of a step are partial sums per
  rank. The engines sum them over the group (:func:`sum_reducer`, one all-reduce of a few
  scalars per parameter group) before the step-size update, so every rank computes the same
  step size and applies it to its own shard.

[note: what is reduced, and when]
Per ``step`` / ``step_retrace`` call, with a process group of more than one rank:
``[loss sum, ranks with a loss, retrace requested, ranks without gradient, validation loss sum,
ranks with one, training loss sum, ranks with one]`` (one all-reduce, SUM). A NaN or infinite loss
on any rank makes the sum non-finite, so every rank retraces. Sharded parameters add, per real
step, one all-reduce of the engine's partial sums (5 per parameter group; 2 without weight
decay in the pure-torch engine) and, while gradients are collected, one of ``|g|^2`` per call.
Replicated parameters (DDP) need nothing more: their gradients are already identical on every
rank. The very first step checks once (one all-reduce, MAX) that the ranks of a non-sharded
optimizer really hold the same parameters, and raises otherwise (an optimizer under ZeRO that
was not told ``sharded=True``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, NamedTuple, Optional

import torch

logger = logging.getLogger("elra")
AUTO = "auto"
REPLICA_TOLERANCE = 1e-6  # relative difference of |x|^2 across ranks still taken as "the same"


def _dist():
    import torch.distributed as dist

    return dist


def dist_ready() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def resolve_process_group(arg: Any):
    """The process group an optimizer synchronises over, or ``None`` for none.

    ``"auto"``: the world group when ``torch.distributed`` is initialised, else none. ``None``:
    none. A ``ProcessGroup``: that group. A group of one rank is the same as none.
    """
    if arg is None:
        return None
    if isinstance(arg, str):
        if arg != AUTO:
            raise ValueError(f"process_group must be 'auto', None or a ProcessGroup, got {arg!r}")
        if not dist_ready():
            return None
        group = _dist().group.WORLD
    else:
        if not torch.distributed.is_available() or not isinstance(arg, _dist().ProcessGroup):
            raise TypeError("process_group must be 'auto', None or a "
                            f"torch.distributed.ProcessGroup, got {type(arg).__name__}")
        if not dist_ready():
            raise RuntimeError("process_group was given, but torch.distributed is not "
                               "initialised (call torch.distributed.init_process_group first)")
        group = arg
    size = _dist().get_world_size(group)
    if size < 1:
        raise ValueError("this process is not a member of the given process_group")
    return group if size > 1 else None


def communication_device(group) -> torch.device:
    """Where the small tensors of a collective live: the current GPU for NCCL, else the CPU."""
    dist = _dist()
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_reducer(group) -> Callable[[torch.Tensor], None]:
    """A function that sums a tensor over ``group`` in place (the engines' hook)."""
    dist = _dist()
    op = dist.ReduceOp.SUM

    def reduce_(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=op, group=group)

    return reduce_


# --- DTensor parameters (FSDP2) ---------------------------------------------------------------------
def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter)."""
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise), aliasing its storage."""
    return t._local_tensor if is_dtensor(t) else t


def dtensor_shard_group(params: list) -> Optional[Any]:
    """The process group over which the local shards of DTensor ``params`` add up.

    All DTensor parameters must live on one device mesh and be sharded (``Shard``) on the same
    single mesh dimension; ``Replicate`` dimensions (HSDP) hold copies and are not summed.
    Returns ``None`` when no parameter is sharded (all replicated, or a one-rank mesh).
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh, dims = None, None
    for p in params:
        if mesh is not None and p.device_mesh != mesh:
            raise ValueError("ElraOptimizer: all DTensor parameters must live on one device mesh")
        mesh = p.device_mesh
        shard_dims = []
        for i, pl in enumerate(p.placements):
            if isinstance(pl, Shard):
                shard_dims.append(i)
            elif not isinstance(pl, Replicate):
                raise ValueError(f"ElraOptimizer: DTensor parameters must be sharded (Shard) or "
                                 f"replicated (Replicate), got placement {pl}")
        if dims is not None and shard_dims != dims:
            raise ValueError("ElraOptimizer: all DTensor parameters must be sharded on the same "
                             f"mesh dimension, got {dims} and {shard_dims}")
        dims = shard_dims
    if not dims or mesh.size(dims[0]) == 1:
        return None
    if len(dims) > 1:
        raise NotImplementedError("ElraOptimizer: parameters sharded on several mesh dimensions "
                                  "are not supported (FSDP2 shards on one)")
    return mesh.get_group(dims[0])


def as_dtensor_like(local: torch.Tensor, param) -> Any:
    """``local`` (a view of a shard, laid out like ``param``'s local tensor) as a DTensor with
    ``param``'s mesh, placements and global shape; shares ``local``'s memory."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


# --- agreeing on the losses -------------------------------------------------------------------------
class Agreement(NamedTuple):
    """What the ranks agreed on for one call."""

    loss: Optional[float]  # mean over the ranks that had one; None if none had
    retrace_requested: bool  # some rank called step_retrace (or asked for a retrace)
    no_gradient: bool  # no rank had any gradient
    valid_loss: Optional[float]  # mean of the validation losses recorded since the last call
    train_loss: Optional[float]


class LossAgreement:
    """One all-reduce per call that makes every rank decide from the same loss values."""

    def __init__(self, group):
        self.group = group
        self.world_size = _dist().get_world_size(group)
        self.device = communication_device(group)
        self.calls = 0
        self._checked = False

    def agree(self, loss: Optional[float], retrace_requested: bool, no_gradient: bool,
              valid_loss: Optional[float], train_loss: Optional[float],
              replicas: Optional[list] = None) -> Agreement:
        """The values of one call, agreed over the group. ``replicas``: the flat buffers of an
        optimizer that is not sharded, checked once to be the same on every rank."""
        if replicas is not None:
            self.check_replicated_once(replicas)
        has_loss = loss is not None
        vals = [loss if has_loss else 0.0, float(has_loss), float(retrace_requested),
                float(no_gradient),
                valid_loss if valid_loss is not None else 0.0, float(valid_loss is not None),
                train_loss if train_loss is not None else 0.0, float(train_loss is not None)]
        t = torch.tensor(vals, dtype=torch.float64, device=self.device)
        _dist().all_reduce(t, op=_dist().ReduceOp.SUM, group=self.group)
        s = t.tolist()
        self.calls += 1
        return Agreement(
            loss=s[0] / s[1] if s[1] > 0 else None,
            retrace_requested=s[2] > 0,
            no_gradient=s[3] >= self.world_size,
            valid_loss=s[4] / s[5] if s[5] > 0 else None,
            train_loss=s[6] / s[7] if s[7] > 0 else None)

    def check_replicated_once(self, buffers: list) -> None:
        """:meth:`check_replicated` on the flat ``buffers``, at the first call only."""
        if not self._checked:
            self._checked = True
            sq = sum(float(torch.linalg.vector_norm(b.data.float())) ** 2 for b in buffers)
            self.check_replicated(sum(b.numel for b in buffers), sq)

    def check_replicated(self, numel: int, sqnorm: float) -> None:
        """Raise on every rank if the ranks' (non-sharded) parameters differ."""
        t = torch.tensor([numel, -numel, sqnorm, -sqnorm], dtype=torch.float64,
                         device=self.device)
        _dist().all_reduce(t, op=_dist().ReduceOp.MAX, group=self.group)
        n_max, n_min, x_max, x_min = t[0].item(), -t[1].item(), t[2].item(), -t[3].item()
        same_x = math.isfinite(x_max) and x_max - x_min <= REPLICA_TOLERANCE * max(x_max, 1e-30)
        if n_max != n_min or not same_x:
            raise RuntimeError(
                "ElraOptimizer: the ranks of the process group hold different parameters "
                f"({n_min:.0f} to {n_max:.0f} elements, squared norm {x_min:.6g} to "
                f"{x_max:.6g}). Under ZeroRedundancyOptimizer each rank optimizes a shard: pass "
                "sharded=True (ZeroRedundancyOptimizer(params, optimizer_class=ElraOptimizer, "
                "sharded=True, ...)). With DistributedDataParallel, create the optimizer for the "
                "same model on every rank. To let every rank decide alone, pass "
                "process_group=None.")


# --- how this process's parameters relate to the other ranks' ----------------------------------------
class Sharding(NamedTuple):
    """Replicated (DDP, one process), a ZeRO shard, or DTensor shards (FSDP2)."""

    mirror: bool  # DTensor parameters: the flat buffers mirror their local shards
    sharded: bool  # this process holds a shard: the reductions are summed over a group
    reducer: Optional[Callable[[torch.Tensor], None]]  # that sum (None: replicated)
    publish_extra: bool  # ZeRO: the groups carry ELRA's scalars (see ZeroPublisher)


def sharding_of(params: list, sharded: Optional[bool], group) -> Sharding:
    """How the trainable ``params`` are split over ``group`` (``sharded``: the user's argument,
    ``None`` to detect). Raises ``ValueError`` for a setting that cannot work."""
    dtensors = [is_dtensor(p) for p in params]
    if any(dtensors):
        if not all(dtensors):
            raise ValueError("ElraOptimizer: DTensor parameters (FSDP2) and plain tensors "
                             "cannot be mixed in one optimizer; shard the whole model with "
                             "fully_shard or use one optimizer per kind")
        reduce_group = dtensor_shard_group(params)
        if sharded is False and reduce_group is not None:
            raise ValueError("sharded=False, but the parameters are sharded DTensors (FSDP2); "
                             "leave sharded at None")
        return Sharding(True, reduce_group is not None,
                        sum_reducer(reduce_group) if reduce_group is not None else None, False)
    if sharded and group is None and not _single_rank():
        raise ValueError("sharded=True needs torch.distributed to be initialised (the shards "
                         "are summed over the process group)")
    reducer = sum_reducer(group) if sharded and group is not None else None
    return Sharding(False, bool(sharded), reducer, bool(sharded))


def _single_rank() -> bool:
    """torch.distributed is initialised with one rank: nothing to sum over."""
    return dist_ready() and _dist().get_world_size() == 1


# --- checkpoints through ZeroRedundancyOptimizer ------------------------------------------------------
class ZeroPublisher:
    """ELRA's scalars in the parameter groups, for ``ZeroRedundancyOptimizer``.

    [note: checkpoints through ZeroRedundancyOptimizer]
    ZeRO's consolidate_state_dict() calls the optimizer's state_dict() on every rank, but its own
    state_dict() keeps only the per-parameter "state" of those and takes the parameter groups
    from its own copies, which it syncs from the optimizer's groups; its load_state_dict()
    assigns the optimizer's per-parameter state directly and syncs the saved groups back,
    without calling the optimizer's load_state_dict(). So, with sharded=True and plain
    parameters, every group carries the key "elra": one dict that state_dict() refreshes in
    place (ZeRO's groups hold the same dict, so its consolidated state has the scalars), and a
    call that finds another dict there, or the per-parameter state replaced, loads what it finds
    through load_state_dict() (:meth:`adopt`).
    """

    def __init__(self):
        self.holder: dict = {}
        self._adopted: Optional[dict] = None

    def attach(self, groups: list[dict]) -> None:
        for g in groups:
            g["elra"] = self.holder

    def refresh(self, extra: dict) -> None:
        """Put the current scalars into the dict the groups (and ZeRO's) share, in place."""
        self.holder.clear()
        self.holder.update(extra)

    def adopt(self, opt) -> None:
        """Load a state that ZeRO put into ``opt`` (an ElraOptimizer) from outside, if any."""
        groups = opt.param_groups
        held = groups[0].get("elra") if groups else None
        first, entry = opt._views.first
        replaced = opt.state.get(first) is not entry
        if not replaced and (held is self.holder or held is self._adopted):
            if held is not self.holder:  # ZeRO synced an adopted dict back: ours again,
                self.attach(groups)  # so that ZeRO takes ours after this step
            return
        if not isinstance(held, dict) or held is self.holder or not held:
            raise RuntimeError("the optimizer's per-parameter state was replaced without ELRA's "
                               "scalars (the 'elra' entry of the parameter groups): load a "
                               "state saved by ElraOptimizer (or ZeroRedundancyOptimizer "
                               "around it) with load_state_dict")
        params = [p for g in groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        owned = opt._layout.owned
        sd = {"state": {index[id(p)]: dict(opt.state[p]) for p in params
                        if id(p) in owned and p in opt.state},
              "param_groups": [dict(g, params=[index[id(p)] for p in g["params"]])
                               for g in groups]}
        opt.load_state_dict(sd)
        self._adopted = held
        self.attach(groups)
        logger.info("elra: adopted a state loaded from outside (ZeroRedundancyOptimizer)")
