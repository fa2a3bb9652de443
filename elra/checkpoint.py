"""Checkpoints of ``ElraOptimizer``: the complete state in torch's layout, checked before loading.

``state_dict()`` has torch's two keys. ``state`` maps each trainable parameter to views of the
engine's flat vectors (``direction``, ``retrace_point``, ``collected``, ``boost_average``);
every parameter group carries the key ``"elra"`` with the optimizer's scalars: the control law,
the engine's scalar slots by name, the collection in progress, boosting, the loss recorded for
the next step. Only tensors, numbers, strings, lists and dicts: ``torch.load(weights_only=True)``
reads it. Checkpoints are versioned (``STATE_VERSION``); keys that older ones lack get defaults.
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Optional

import torch

from .boost import Booster
from .control import LossControl, normalize_weight_decay
from .distributed import as_dtensor_like, is_dtensor, local_tensor
from .engine import Engine

STATE_VERSION = 1


def extra_state(opt) -> dict:
    """The scalars of ``opt`` (an ElraOptimizer) that go under the groups' ``"elra"`` key."""
    st = opt._stepper
    return {
        "version": STATE_VERSION,
        "mode": opt.mode,
        "momentum": st.engine.momentum,
        "control": st.control.to_dict(),
        "engine": st.engine.scalar_state(),
        "collected_losses": list(st.losses),
        "boost": st.booster.state() if st.booster is not None else None,
        "shown_lr": opt._shown_lr,
        "last_outcome": st.last_outcome,
        "recorded_loss": list(opt._recorded),
        "pending_losses": list(opt._pending_losses),
        "evaluating": opt._train_point is not None,  # see [note: evaluation mode] (boost.py)
    }


def state_dict(opt, base: dict) -> dict:
    """``base`` (torch's ``Optimizer.state_dict()`` of ``opt``) with ELRA's scalars added; the
    vectors of DTensor parameters as DTensors laid out like their parameters."""
    extra = extra_state(opt)
    for g in base["param_groups"]:
        g["elra"] = copy.deepcopy(extra)
    if opt._layout.mirror:
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, entry in base["state"].items():
            p = params[i]
            if is_dtensor(p):
                base["state"][i] = {k: as_dtensor_like(v, p) for k, v in entry.items()}
    if opt._zero is not None:  # in place: ZeroRedundancyOptimizer's groups share the dict
        opt._zero.refresh(copy.deepcopy(extra))
    return base


class Loaded(NamedTuple):
    """A checked state, ready to be applied."""

    extra: dict
    control: LossControl
    engine: Engine
    booster: Optional[Booster]
    decays: list[float]
    index: dict  # saved parameter id -> parameter


def saved_extra(sd, groups: list, key: str, who: str) -> tuple[list, dict]:
    """The saved parameter groups of a state dict ``sd`` for an optimizer with ``groups`` and
    the optimizer's scalars under ``key`` of the first group; ``ValueError`` (``who``: the
    optimizer's name) for something else or another number of groups."""
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("not an optimizer state dict (needs 'state' and 'param_groups')")
    saved = sd["param_groups"]
    if len(saved) != len(groups):
        raise ValueError(f"the state has {len(saved)} parameter groups, this optimizer "
                         f"has {len(groups)}")
    extra = saved[0].get(key) if saved else None
    if not isinstance(extra, dict):
        raise ValueError(f"the state was not saved by {who} (no '{key}' entry)")
    return saved, extra


def check(opt, sd: dict) -> Loaded:
    """Everything ``load_state_dict`` needs from ``sd``, checked; raises ``ValueError`` (and
    changes nothing) for a state of another version, group or parameter layout or shapes."""
    groups, extra = saved_extra(sd, opt.param_groups, "elra", "ElraOptimizer")
    if extra.get("version", 0) > STATE_VERSION:
        raise ValueError(f"the state has version {extra.get('version')}, newer than this "
                         f"elra ({STATE_VERSION}); upgrade elra")
    index: dict = {}
    for saved, mine in zip(groups, opt.param_groups):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError("a parameter group of the state has "
                             f"{len(saved['params'])} parameters, this one has "
                             f"{len(mine['params'])}")
        index.update(zip(saved["params"], mine["params"]))
    control = LossControl.from_dict(extra["control"])
    _check_vectors(opt, sd["state"], index, extra, control)
    try:
        momentum = float(extra.get("momentum", 0.0))
        engine = opt._new_engine(1.0, control.stochastic, momentum)
        engine.load_scalar_state(extra["engine"])
        booster = None
        if extra.get("boost") is not None:
            booster = Booster(opt._layout.buffers)
            booster.load_state(extra["boost"])
        decays = [normalize_weight_decay(g.get("weight_decay", 0.0)) for g in groups]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"the ELRA state is incomplete or invalid: {e!r}") from None
    return Loaded(extra, control, engine, booster, decays, index)


def _check_vectors(opt, saved_state: dict, index: dict, extra: dict,
                   control: LossControl) -> None:
    owned = opt._layout.owned
    for sid, entry in saved_state.items():
        p = index.get(sid)
        if p is None:
            raise ValueError(f"the state has an entry for unknown parameter {sid!r}")
        if id(p) not in owned:
            raise ValueError("the state holds state for a parameter that is frozen here: "
                             "the parameter layout differs")
        for name, t in entry.items():
            if not isinstance(t, torch.Tensor) or not _fits(t, p):
                raise ValueError(f"state '{name}' of a parameter has shape "
                                 f"{tuple(getattr(t, 'shape', ()))}, the parameter has "
                                 f"{tuple(p.shape)}")
    if int(extra.get("engine", {}).get("collected_count", 0)) > 0 and \
            not any("collected" in e for e in saved_state.values()):
        raise ValueError("the state was saved in the middle of a gradient collection but "
                         "holds no collected gradient: when loading through a template "
                         "(torch.distributed.checkpoint), build the optimizer with the "
                         f"checkpoint's collects={control.collects} so that the template "
                         "has the collection buffer")
    saved_ids = {id(index[sid]) for sid in saved_state}
    if saved_ids != owned:
        raise ValueError(f"the state covers {len(saved_ids)} trainable parameters, this "
                         f"optimizer has {len(owned)}: the parameter layout differs")


def _fits(t: torch.Tensor, p: torch.Tensor) -> bool:
    """A saved state tensor fits a parameter: same shape; for a DTensor parameter a DTensor of
    its shape whose local shard matches, or a plain tensor of the local shard's shape."""
    if not is_dtensor(p):
        return t.shape == p.shape and not is_dtensor(t)
    if is_dtensor(t):
        return t.shape == p.shape and local_tensor(t).shape == local_tensor(p).shape
    return t.shape == local_tensor(p).shape


def apply(opt, new: Loaded, sd: dict) -> None:
    """Put a checked state into ``opt``: the groups' settings, the control law, engine and
    boosting, the scalars of the optimizer, then the vectors into the new state views."""
    extra, st = new.extra, opt._stepper
    for saved, mine, wd in zip(sd["param_groups"], opt.param_groups, new.decays):
        mine.update((k, v) for k, v in saved.items() if k not in ("params", "elra"))
        mine["weight_decay"] = wd
    st.control, st.engine, st.booster = new.control, new.engine, new.booster
    if any("collected" in e for e in sd["state"].values()) or new.control.collects > 1:
        st.engine.ensure_collection()
        st.engine.collected_count = int(extra["engine"]["collected_count"])
    st.losses = [float(v) for v in extra.get("collected_losses", [])]
    st.last_outcome = str(extra.get("last_outcome", "none"))
    rec = extra.get("recorded_loss", [0.0, 0])
    opt._recorded = [float(rec[0]), int(rec[1])]
    opt._pending_losses = [None if v is None else float(v)
                           for v in extra.get("pending_losses", [None, None])]
    opt._shown_lr = float(extra.get("shown_lr", opt._shown_lr))
    saved_eval = bool(extra.get("evaluating", False)) and new.booster is not None and \
        any("train_point" in e for e in sd["state"].values())
    opt._train_point = [b.data.clone() for b in opt._layout.buffers] if saved_eval else None
    opt._views.publish(opt._vectors())
    for sid, entry in sd["state"].items():
        p = new.index[sid]
        for name, t in entry.items():
            if name in opt.state[p]:
                opt.state[p][name].copy_(local_tensor(t) if is_dtensor(t) else t)
    for g in opt.param_groups:
        g["lr"] = opt._shown_lr
