"""``ElraOptimizer``: the ``torch.optim.Optimizer`` face of ELRA/P2M: arguments, parameter
groups, the step signature, checkpoints and the public methods. The algorithm lives elsewhere:
the control law in :mod:`elra.control`, a call's sequence in :mod:`elra.stepper`, the vector work
in :mod:`elra.engine` (over the ops of :mod:`elra._ops`), the flat buffers and their views in
:mod:`elra.flat_buffer`, the ranks' agreement in :mod:`elra.distributed`, boosting in
:mod:`elra.boost`, checkpoints in :mod:`elra.checkpoint`."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional, Union

import torch

from . import _args, checkpoint
from ._step_hooks import hooked
from .boost import Boosting
from .control import INITIAL_LR, LossControl
from .distributed import AUTO, LossAgreement, ZeroPublisher, resolve_process_group, sharding_of
from .engine import Engine, make_engine
from .flat_buffer import Layout, StateViews, copy_views
from .stepper import Stepper

logger = logging.getLogger("elra")
_NAN = float("nan")


class ElraOptimizer(Boosting, torch.optim.Optimizer):
    """ELRA/P2M: gradient descent that sets its own step size from the angle of consecutive
    gradients, retraces failed steps, grows its batch and controls its weight decay.

    The positional order is the reference package's: ``ElraOptimizer(params, model,
    batch_size, classes, lr=..., weight_decay=...)`` works unchanged.

    Args:
        params: parameters or groups, as for any torch optimizer; groups may carry their own
            ``weight_decay``. Real floating point tensors (fp16/bf16/fp32/fp64), each group on
            one device.
        model: the module :meth:`get_boost_model` copies when it is given none.
        batch_size: samples per ``step`` (default 8; 0 means 8); shapes the long window.
        classes: classes of a classification task, as in the reference: ``classes > 1``
            selects the stochastic regime; ``log(classes)`` bounds the first loss estimate.
        lr: the first step length along the gradient (default 1e-5; finite, > 0); ELRA grows
            or shrinks it by itself within a few steps.
        mode: ``"P2M"`` (or ``"p2min"``) only; ``"C2M"`` was discontinued and raises.
        dummy: ignored (positional compatibility with the reference).
        momentum: ``beta`` in [0, 1); ``None`` or 0: none (default).
        weight_decay: decay in [0, 0.1) (e.g. 1e-4) or a keep factor > 0.5 read as
            ``1 - value`` (0.9999 is 1e-4). ELRA scales it with the gradient; once
            :meth:`set_valid_loss` and :meth:`set_train_loss` were called it sets its own
            factor from the train/validation gap.
        warmup: steps over which the stochastic step ramps up (default 1: none).
        regime: ``"stochastic"`` (mini-batch training: a damped, scheduled step, retrace,
            batch growth, decay control) or ``"deterministic"`` (full batch: the step is
            ``alpha``). ``None`` (default): by ``classes`` when given, else stochastic when
            ``warmup > 1``, else deterministic with a warning (it barely trains a network).
        collects: calls averaged into one step at first (default 1); doubled on stalls.
        engine: the kernels: ``"auto"`` (default: native where built for the parameters'
            device, else pure torch), ``"torch"``, or ``"native"`` (``RuntimeError`` where
            they cannot run). :attr:`engine_name` and :func:`elra.native_status` tell.
        process_group: the ranks that train together: each call's loss (and the validation
            and training losses) is averaged over them in one small all-reduce, so all ranks
            decide alike and, under DDP, take bit-identical steps; the calls are then
            collective. ``"auto"`` (default): the world group when ``torch.distributed`` is
            initialised, else none; ``None``: decide alone; or a ``ProcessGroup``.
            ``TypeError``/``ValueError`` for another type, string or a group without this
            process, ``RuntimeError`` for a group without ``torch.distributed``.
        sharded: this process holds a shard: the reductions are summed over the group.
            ``None`` (default): ``True`` for DTensor parameters (FSDP2), else ``False``; pass
            ``True`` under ``ZeroRedundancyOptimizer``. ``ValueError`` for ``True`` without a
            group, ``False`` with sharded DTensors, or DTensors mixed with plain tensors.

    Other bad arguments raise ``TypeError``/``ValueError`` saying what was expected. A step
    needs the loss: ``step(loss)``, ``step(closure)``, :meth:`set_loss` before a bare
    ``step()``, or :class:`ElraGradScaler` (without, see :meth:`step`).
    ``param_groups[i]["lr"]`` shows the step length applied; changes to it from outside (LR
    schedulers) are ignored with one warning. :attr:`stats` shows ELRA's own state.
    """

    def __init__(self, params: Iterable, model: Optional[torch.nn.Module] = None,
                 batch_size: int = 8, classes: Optional[int] = None, lr: float = 1e-5,
                 mode: Any = "P2M", dummy: Any = None, momentum: Optional[float] = None,
                 weight_decay: float = 0.0, warmup: int = 1, *, regime: Optional[str] = None,
                 collects: int = 1, engine: str = "auto", process_group: Any = AUTO,
                 sharded: Optional[bool] = None):
        a = _args.constructor_args(lr, batch_size, classes, momentum, weight_decay, warmup,
                                   regime, collects, engine, sharded, process_group)
        self.mode = _args.mode_name(mode)
        self._group = resolve_process_group(process_group)
        self._agreement = LossAgreement(self._group) if self._group is not None else None
        self._ready, self._model, self._warned, self._train_point = False, model, set(), None
        super().__init__(params, {"lr": a["lr"], "weight_decay": a["weight_decay"]})
        self._engine_choice = engine
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        self._sharding = sharding_of(params, sharded, self._group)
        self._zero = ZeroPublisher() if self._sharding.publish_extra else None
        self._recorded = [0.0, 0]  # set_loss: sum and count of the losses for the next step
        self._pending_losses: list = [None, None]  # validation, training: for the next call
        self._shown_lr = a["lr"]
        control = LossControl(**a["control"])
        self._layout = Layout(self.param_groups, self._sharding.mirror)
        self._stepper = Stepper(control, self._new_engine(a["lr"], control.stochastic,
                                                          a["momentum"], control.collects))
        self._views = StateViews(self._layout, self.state)
        self._views.publish(self._vectors())
        if self._zero is not None:
            self._zero.attach(self.param_groups)
        self._ready = True

    # --- construction ---------------------------------------------------------------------------
    def _new_engine(self, alpha: float, stochastic: bool, momentum: float,
                    collects: int = 1) -> Engine:
        s = self._sharding
        engine = make_engine(self._layout.buffers, self._engine_choice, stochastic=stochastic,
                             momentum=momentum, alpha=alpha, lr=INITIAL_LR, reducer=s.reducer,
                             num_groups=len(self.param_groups))
        if collects > 1:  # so that a checkpoint template has the buffer (DCP)
            engine.ensure_collection()
        return engine

    def _rebuild(self) -> None:
        """Lay the parameters out anew (the parameter set changed), carrying all state over."""
        self.train()  # the training point back into the parameters (if evaluating)
        st = self._stepper
        old = self._layout.views(self._vectors())
        self._layout = Layout(self.param_groups, self._sharding.mirror)
        st.move_to(self._layout.buffers,
                   self._new_engine(1.0, st.control.stochastic, st.engine.momentum))
        self._views = StateViews(self._layout, self.state)
        self._views.publish(self._vectors())
        copy_views(old, self._layout.views(self._vectors()))
        logger.info("elra: parameter layout rebuilt (%d buffers, %d elements)",
                    len(self._layout.buffers), self._layout.numel)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (e.g. with its own ``weight_decay``); same rules as the constructor."""
        group = _args.param_group(param_group)
        if "lr" in group and group["lr"] != self.defaults.get("lr"):
            _args.warn_once(self._warned, "group_lr", "ElraOptimizer uses one step length for "
                            "all parameters; the 'lr' of a parameter group is ignored", 3)
        group.pop("lr", None)
        super().add_param_group(group)
        if self._ready:
            self.param_groups[-1]["lr"] = self._shown_lr
            if self._zero is not None:
                self._zero.attach(self.param_groups)
            self._rebuild()

    # --- properties -----------------------------------------------------------------------------
    @property
    def regime(self) -> str:
        """``"stochastic"`` or ``"deterministic"``."""
        return "stochastic" if self._stepper.control.stochastic else "deterministic"

    @property
    def engine_name(self) -> str:
        """The kernels doing the vector work (``"native"`` or ``"torch"``)."""
        return self._stepper.engine.name

    @property
    def process_group(self):
        """The process group the ranks agree over, or ``None`` (one process decides alone)."""
        return self._group

    @property
    def sharded(self) -> bool:
        """Whether this process optimizes a shard (reductions summed over the group)."""
        return self._sharding.sharded

    @property
    def last_outcome(self) -> str:
        """What the last call did: ``"first"``, ``"accepted"``, ``"collected"`` or a retrace:
        ``"retrace_loss"``, ``"retrace_gradient"``, ``"retrace_no_gradient"``,
        ``"retrace_requested"`` (on a GPU a step reads as taken until the next call)."""
        return self._stepper.last_outcome

    @property
    def stats(self) -> dict:
        """A snapshot of ELRA's own state (waits for the device's last step): ``steps`` (real
        steps, retraces included), ``retraces``, ``collects`` (calls per step), ``alpha``,
        ``lr`` (the stochastic step), ``step_size`` (the step last applied), ``threshold``
        (the accept bound for the next loss), ``schedule``, ``grad_norm_avg``,
        ``no_loss_steps``, ``buffer_bytes`` (ELRA's own vectors and working memory)."""
        if self._zero is not None:
            self._zero.adopt(self)
        return self._stepper.stats()

    # --- per call -------------------------------------------------------------------------------
    def _begin_call(self, f: Optional[float], requested: bool) -> tuple:
        """Bring layout, groups and the last step up to date; the loss and flags all ranks
        decide from (see :mod:`elra.distributed`). Validation/training losses recorded since
        the last call go to the control law."""
        if self._train_point is not None:
            raise RuntimeError("ElraOptimizer is in evaluation mode (eval() put the boosted "
                               "average into the parameters): call optimizer.train() first")
        if self._zero is not None:
            self._zero.adopt(self)
        if self._layout.changed(self.param_groups):
            self._rebuild()
        if any(g["lr"] != self._shown_lr for g in self.param_groups):
            _args.warn_once(self._warned, "scheduler", "ElraOptimizer sets its own step length; "
                            "a change of param_groups[...]['lr'] (e.g. by an LR scheduler) is "
                            "ignored", 5)
            for g in self.param_groups:
                g["lr"] = self._shown_lr
        self._layout.pull()
        self._stepper.resolve()
        no_gradient = not requested and self._layout.sync_grads() == 0
        valid, train = self._pending_losses
        self._pending_losses = [None, None]
        if self._agreement is not None:
            f, requested, no_gradient, valid, train = self._agreement.agree(
                f, requested, no_gradient, valid, train,
                replicas=None if self.sharded else self._layout.buffers)
        self._stepper.control.take_losses(valid, train)
        return f, requested, no_gradient

    def _end_call(self) -> None:
        st = self._stepper
        self._layout.push()
        self._views.follow(self._vectors, st.engine.direction, st.engine.collected is not None)
        self._shown_lr = float(st.engine.step_size if st.control.started else self._shown_lr)
        for g in self.param_groups:
            g["lr"] = self._shown_lr

    def set_loss(self, loss: Union[float, torch.Tensor]) -> None:
        """Record the loss of the current mini-batch for the next bare ``step()`` (loops that
        call ``optimizer.step()`` without arguments: accelerate, Trainer-style loops). Called
        several times (gradient accumulation), the step takes the mean; ``step(loss)`` or a
        closure discards recorded losses. A number or one-element tensor, read at once
        (``TypeError``/``ValueError`` otherwise); NaN/inf make the step a retrace."""
        f = _args.loss_to_float(loss)
        self._recorded = [self._recorded[0] + f, self._recorded[1] + 1]

    @hooked
    @torch.no_grad()
    def step(self, loss: Union[float, torch.Tensor, Callable, None] = None,
             scale: Optional[float] = None, closure: Optional[Callable] = None, *,
             retrace: bool = False):
        """Take one ELRA step (or collect one gradient) given this call's loss.

        Args:
            loss: this mini-batch's loss at the current parameters (a float or one-element
                tensor), or a closure (also as ``closure=``) that zeroes the gradients, computes
                the loss, calls ``backward()`` and returns it. NaN/inf: a retrace. ``None``: the
                mean of the losses given to :meth:`set_loss`; without any, the step is accepted
                if its gradient is finite, with no loss-based decisions (logged once).
            scale: the factor the gradients carry (loss scaling; default 1, finite, > 0).
            retrace: ``True`` makes the call :meth:`step_retrace` (for wrappers that only
                forward ``step``, e.g. ``ZeroRedundancyOptimizer.step(loss, retrace=True)``).

        Returns the loss (the closure's result). ``TypeError``/``ValueError`` for a loss that is
        not a single number. A non-finite or missing gradient never reaches the parameters:
        the step becomes a retrace; :attr:`last_outcome` says what the call did. With a process
        group the call is collective.
        """
        loss, closure = _args.loss_or_closure(loss, closure)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if retrace:
            self.step_retrace(_NAN if loss is None else loss)
            return loss
        total, n = self._recorded
        f = (total / n if n else None) if loss is None else _args.loss_to_float(loss)
        self._recorded = [0.0, 0]
        inv = _args.loss_scale(scale)
        f, requested, no_gradient = self._begin_call(f, False)
        decays = [g["weight_decay"] for g in self.param_groups]
        if requested:
            self._stepper.fail(f, False, "retrace_requested", decays)
        else:
            self._stepper.step(f, inv, no_gradient, decays)
        self._end_call()
        return loss

    @torch.no_grad()
    def step_retrace(self, loss: Union[float, torch.Tensor]) -> None:
        """Declare the current point failed without using (or needing) its gradient: back to
        the last accepted point, along the last direction with a smaller step; a partial
        collection is dropped. ``loss`` may be NaN. Collective like :meth:`step` (one rank's
        call makes all ranks retrace; under DDP every rank still calls ``backward()``)."""
        f = _args.loss_to_float(loss)
        self._recorded = [0.0, 0]
        f, _, _ = self._begin_call(f, True)
        self._stepper.fail(f, False, "retrace_requested",
                           [g["weight_decay"] for g in self.param_groups])
        self._end_call()

    # --- weight-decay control (boosting: elra/boost.py) -------------------------------------------
    def set_valid_loss(self, loss: Union[float, torch.Tensor], *_ignored: Any, **_kw: Any) -> None:
        """Record a validation loss (e.g. once per epoch) for the dynamic weight decay: with
        :meth:`set_train_loss` too, ELRA decays harder while it exceeds the training loss. Used
        from the next ``step`` (with a process group: averaged over the ranks that gave one).
        ``ValueError`` if not finite; the reference's extra arguments are ignored."""
        self._pending_losses[0] = _args.finite_loss(loss, "validation loss")

    def set_train_loss(self, loss: Union[float, torch.Tensor], *_ignored: Any, **_kw: Any) -> None:
        """Record a training loss (e.g. the epoch mean) for the dynamic weight decay; used at
        the next ``step`` like :meth:`set_valid_loss`."""
        self._pending_losses[1] = _args.finite_loss(loss, "training loss")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. Those of the optimized parameters are views of one flat buffer:
        zeroed in place, they stay attached whatever ``set_to_none`` says, so ``backward()``
        accumulates straight into the buffer. Frozen parameters and DTensor ones (FSDP2) follow
        ``set_to_none``."""
        self._layout.zero_grad(self.param_groups, set_to_none)

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The complete state (see :mod:`elra.checkpoint`): per-parameter vectors (views of the
        flat buffers) under ``state``, the optimizer's scalars under the key ``"elra"`` of every
        parameter group. ``torch.load(weights_only=True)`` reads it. Calling it changes nothing
        (beyond waiting for a device's last step)."""
        self._stepper.resolve()
        if self._zero is not None:
            self._zero.adopt(self)
        return checkpoint.state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`. Checked before anything changes: another
        version, number of groups or parameters, shapes or set of trainable parameters raises
        ``ValueError`` and leaves the optimizer as it was."""
        self._stepper.resolve()
        checkpoint.apply(self, checkpoint.check(self, state_dict), state_dict)
