"""``ElraAdam``: ELRA's angle test on a long-horizon drift of Adam's steps, as a
``torch.optim.Optimizer`` with no learning rate to tune.

The optimizer face only: arguments, parameter groups, the step signature, checkpoints. The rule
is in :mod:`elra.adam_control` (host-side scalars and the loss guard), the vector work in
:mod:`elra.adam_engine` over the ``elra_adam::`` ops of :mod:`elra.adam_ops`, on the flat
buffers of :mod:`elra.flat_buffer`; the ranks agree on the loss through
:mod:`elra.distributed`. The research behind the rule: ``benchmarks/results/elra_adam_research.md``.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from typing import Any, Callable, Iterable, Optional, Union

import torch

from . import _args
from ._step_hooks import hooked
from .adam_control import ALPHA0, STEP_MAX, STEP_MIN, AdamControl
from .adam_engine import VECTORS, make_engine, take_step
from .checkpoint import saved_extra
from .distributed import AUTO, LossAgreement, resolve_process_group
from .flat_buffer import Layout, copy_views

logger = logging.getLogger("elra")
_NAME = "ElraAdam"
_KEY = "elra_adam"  # the key of the scalars in every parameter group of a checkpoint


def _weight_decay(value: Any) -> float:
    """A decoupled weight decay (AdamW's convention): a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"weight_decay must be a number, got {type(value).__name__}: {value!r}")
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"weight_decay must be in [0, 1) (AdamW's decoupled decay, e.g. 0.01), "
                         f"got {value!r}")
    return float(value)


def _alpha0(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"alpha0 must be a number, got {type(value).__name__}: {value!r}")
    if not (math.isfinite(value) and STEP_MIN <= value <= STEP_MAX):
        raise ValueError(f"alpha0 must be a finite number in [{STEP_MIN:g}, {STEP_MAX:g}] "
                         f"(default {ALPHA0:g}), got {value!r}")
    return float(value)


class ElraAdam(torch.optim.Optimizer):
    """Adam's direction with one global step size that ELRA's question sets by itself: does the
    new gradient still point along the way travelled over the last ~1000 steps? The step grows
    by up to 2% a step while it does and shrinks by up to 2% when it points back; growing, it
    stays below twice the largest step of the first half of the run. A loss far above its
    running mean, a NaN/inf loss or a non-finite gradient send the parameters back to the last
    accepted point and quarter the step. There is no learning rate to tune.

    Args:
        params: parameters or groups, as for any torch optimizer; groups may carry their own
            ``weight_decay``. Dense real floating point tensors, each group on one device.
        alpha0: the first step (default 1e-3, Adam's default learning rate; in [1e-9, 1e4]).
            Far too small a start recovers only slowly (the growth cap), far too large (1e-1)
            can break a network in its first steps: keep it near a stable Adam learning rate.
        weight_decay: decoupled weight decay as AdamW's, ``x <- x (1 - step wd)`` (default 0;
            in [0, 1)).
        engine: the kernels: ``"auto"`` (default: native where built, else pure torch),
            ``"torch"``, or ``"native"`` (``RuntimeError`` where they cannot run).
        process_group: the ranks that train together (DDP): each call's loss is averaged over
            them in one small all-reduce, so that every rank decides alike and takes the same
            step. ``"auto"`` (default): the world group when ``torch.distributed`` is
            initialised; ``None``: decide alone; or a ``ProcessGroup``. Sharded optimizers
            (ZeRO, FSDP) are not supported.

    Bad arguments raise ``TypeError`` (wrong kind) or ``ValueError`` (bad value).
    ``param_groups[i]["lr"]`` shows the step the next step applies; changes to it from outside
    (LR schedulers) are ignored with one warning. State per parameter: ``exp_avg``,
    ``exp_avg_sq`` (Adam's moments) and ``drift``, views of flat buffers (3 buffers of the
    parameters' size). A parameter without a gradient counts as a zero gradient.
    """

    def __init__(self, params: Iterable, alpha0: float = ALPHA0, *, weight_decay: float = 0.0,
                 engine: str = "auto", process_group: Any = AUTO):
        alpha0, weight_decay = _alpha0(alpha0), _weight_decay(weight_decay)
        if isinstance(params, (set, torch.Tensor)):
            raise TypeError("params must be an ordered collection (a list, or a module's "
                            f"parameters()) of tensors or groups, got {type(params).__name__}")
        if engine not in _args.ENGINES:
            raise ValueError(f"engine must be one of {_args.ENGINES}, got {engine!r}")
        self._group = resolve_process_group(process_group)
        self._agreement = LossAgreement(self._group) if self._group is not None else None
        self._ready, self._warned, self._engine_choice = False, set(), engine
        super().__init__(params, {"lr": alpha0, "weight_decay": weight_decay})
        self._control = AdamControl(alpha=alpha0, alpha_prev=alpha0, peak=alpha0)
        self._recorded = [0.0, 0]  # set_loss: sum and count of the losses for the next step
        self._outcome = "none"
        self._layout = Layout(self.param_groups)
        self._engine = make_engine(self._layout.buffers, engine)
        self._publish()
        self._show_lr()
        self._ready = True

    # --- layout ---------------------------------------------------------------------------------
    def _publish(self) -> None:
        """Make ``state[p][name]`` the views of the engine's flat vectors."""
        self.state.clear()
        for name, views in self._layout.views(self._engine.vectors).items():
            for p, v in views.items():
                self.state[p][name] = v

    def _rebuild(self) -> None:
        """Lay the parameters out anew (the parameter set changed), carrying the state over."""
        old = self._layout.views(self._engine.vectors)
        self._layout = Layout(self.param_groups)
        self._engine = make_engine(self._layout.buffers, self._engine_choice)
        copy_views(old, self._layout.views(self._engine.vectors))
        self._publish()
        logger.info("elra: ElraAdam's parameter layout rebuilt (%d buffers, %d elements)",
                    len(self._layout.buffers), self._layout.numel)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (e.g. with its own ``weight_decay``); same rules as the constructor."""
        wd = None
        if isinstance(param_group, dict) and "weight_decay" in param_group:
            param_group = dict(param_group)
            wd = _weight_decay(param_group.pop("weight_decay"))
        group = _args.param_group(param_group, _NAME)
        if wd is not None:
            group["weight_decay"] = wd
        if "lr" in group and group["lr"] != self.defaults.get("lr"):
            _args.warn_once(self._warned, "group_lr", "ElraAdam uses one step size for all "
                            "parameters; the 'lr' of a parameter group is ignored", 3)
        group.pop("lr", None)
        super().add_param_group(group)
        if self._ready:
            self._rebuild()
            self._show_lr()

    def _show_lr(self) -> None:
        for g in self.param_groups:
            g["lr"] = self._control.alpha

    # --- properties -----------------------------------------------------------------------------
    @property
    def engine_name(self) -> str:
        """The kernels doing the vector work (``"native"`` or ``"torch"``)."""
        return self._engine.name

    @property
    def process_group(self):
        """The process group the ranks agree over, or ``None``."""
        return self._group

    @property
    def last_outcome(self) -> str:
        """What the last call did: ``"none"`` (no call yet), ``"accepted"``, ``"no_gradient"``
        (no parameter had a gradient: nothing changed), ``"retrace_loss"`` or
        ``"retrace_gradient"``."""
        return self._outcome

    @property
    def stats(self) -> dict:
        """``steps`` (accepted), ``retraces``, ``alpha`` (the next step), ``step_size`` (the
        step last applied), ``buffer_bytes`` (the state vectors ``m``, ``v``, ``D``)."""
        c = self._control
        nbytes = sum(t.numel() * t.element_size() for ts in self._engine.vectors.values()
                     for t in ts)
        return {"steps": c.t, "retraces": c.retraces, "alpha": c.alpha,
                "step_size": c.alpha_prev, "buffer_bytes": nbytes}

    # --- per call -------------------------------------------------------------------------------
    def set_loss(self, loss: Union[float, torch.Tensor]) -> None:
        """Record the loss of the current mini-batch for the next bare ``step()`` (loops that
        call ``optimizer.step()`` without arguments). Called several times (gradient
        accumulation), the step takes the mean; ``step(loss)`` or a closure discards recorded
        losses. A number or one-element tensor (``TypeError``/``ValueError`` otherwise)."""
        f = _args.loss_to_float(loss)
        self._recorded = [self._recorded[0] + f, self._recorded[1] + 1]

    @hooked
    @torch.no_grad()
    def step(self, loss: Union[float, torch.Tensor, Callable, None] = None,
             closure: Optional[Callable] = None):
        """Take one step given this call's loss.

        Args:
            loss: this mini-batch's loss at the current parameters (a float or one-element
                tensor), or a closure (also as ``closure=``) that zeroes the gradients, computes
                the loss, calls ``backward()`` and returns it. NaN/inf: a retrace. ``None``: the
                mean of the losses given to :meth:`set_loss`; without any, the loss guard is
                off for this call and only a non-finite gradient retraces.

        Returns the loss (the closure's result). ``TypeError``/``ValueError`` for a loss that is
        not a single number. A non-finite gradient never reaches the parameters: the call
        becomes a retrace. With a process group the call is collective.
        """
        loss, closure = _args.loss_or_closure(loss, closure)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        total, n = self._recorded
        f = (total / n if n else None) if loss is None else _args.loss_to_float(loss)
        self._recorded = [0.0, 0]
        if any(g["lr"] != self._control.alpha for g in self.param_groups):
            _args.warn_once(self._warned, "scheduler", "ElraAdam sets its own step size; a change "
                            "of param_groups[...]['lr'] (e.g. by an LR scheduler) is ignored", 3)
        if self._layout.changed(self.param_groups):
            self._rebuild()
        no_gradient = self._layout.sync_grads() == 0
        if self._agreement is not None:
            agreed = self._agreement.agree(f, False, no_gradient, None, None)
            f, no_gradient = agreed.loss, agreed.no_gradient
        decays = [g["weight_decay"] for g in self.param_groups]
        self._outcome = take_step(self._control, self._engine, f, decays, no_gradient)
        self._show_lr()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. Those of the optimized parameters are views of one flat buffer:
        zeroed in place, they stay attached whatever ``set_to_none`` says; frozen parameters
        follow ``set_to_none``."""
        self._layout.zero_grad(self.param_groups, set_to_none)

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's layout: ``state`` holds ``exp_avg``, ``exp_avg_sq`` and ``drift`` of every
        trainable parameter, every parameter group the key ``"elra_adam"`` with the scalars.
        ``torch.load(weights_only=True)`` reads it."""
        base = super().state_dict()
        extra = {"control": self._control.to_dict(), "last_outcome": self._outcome,
                 "recorded_loss": list(self._recorded)}
        for g in base["param_groups"]:
            g[_KEY] = copy.deepcopy(extra)
        return base

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`, checked before anything changes: another
        number of groups or parameters, other shapes or a state of another optimizer raise
        ``ValueError`` and leave the optimizer as it was."""
        extra, control, decays, index = _check_state(self, state_dict)
        for saved, mine, wd in zip(state_dict["param_groups"], self.param_groups, decays):
            mine.update((k, v) for k, v in saved.items() if k not in ("params", _KEY))
            mine["weight_decay"] = wd
        for sid, entry in state_dict["state"].items():
            for name, t in entry.items():
                self.state[index[sid]][name].copy_(t)
        self._control = control
        self._outcome = str(extra.get("last_outcome", "none"))
        rec = extra.get("recorded_loss", [0.0, 0])
        self._recorded = [float(rec[0]), int(rec[1])]
        self._show_lr()


def _check_state(opt: ElraAdam, sd: Any) -> tuple:
    """``(extra, control, decays, index)`` of a state for ``opt``, checked (``ValueError``)."""
    groups, extra = saved_extra(sd, opt.param_groups, _KEY, _NAME)
    control = AdamControl.from_dict(extra.get("control", {}))
    index: dict = {}
    for saved, mine in zip(groups, opt.param_groups):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError(f"a parameter group of the state has {len(saved['params'])} "
                             f"parameters, this one has {len(mine['params'])}")
        index.update(zip(saved["params"], mine["params"]))
    owned = opt._layout.owned
    for sid, entry in sd["state"].items():
        p = index.get(sid)
        if p is None or id(p) not in owned:
            raise ValueError(f"the state has an entry for parameter {sid!r}, which is not a "
                             "trainable parameter here: the parameter layout differs")
        if set(entry) != set(VECTORS) or any(not isinstance(t, torch.Tensor) or
                                             t.shape != p.shape for t in entry.values()):
            raise ValueError(f"the state of parameter {sid!r} must hold {VECTORS} of shape "
                             f"{tuple(p.shape)}")
    if {id(index[sid]) for sid in sd["state"]} != owned:
        raise ValueError(f"the state covers {len(sd['state'])} trainable parameters, this "
                         f"optimizer has {len(owned)}: the parameter layout differs")
    try:
        decays = [_weight_decay(g.get("weight_decay", 0.0)) for g in groups]
    except TypeError as e:
        raise ValueError(str(e)) from None
    return extra, control, decays, index

