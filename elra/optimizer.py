"""``ElraOptimizer``: the ``torch.optim.Optimizer`` face of ELRA/P2M.

This class is deliberately thin: it validates input, keeps the parameter groups and the flat
layout in step with the model, turns the user's loss into a float, sequences one ELRA step from
the control law (:mod:`elra.control`) and an engine (:mod:`elra.engine`), and saves and loads the
complete state. The algorithm itself lives in those modules.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import operator
import warnings
from itertools import compress
from typing import Any, Callable, Iterable, Optional, Union

import torch

from .boost import Booster
from .control import INITIAL_LR, MAX_COLLECTS, LossControl, normalize_weight_decay
from .distributed import (AUTO, LossAgreement, as_dtensor_like, dtensor_shard_group, is_dtensor,
                          local_tensor, resolve_process_group, sum_reducer)
from .engine import Engine, TorchEngine
from .engine_native import NativeEngine
from .flat_buffer import FlatBuffer

logger = logging.getLogger("elra")

STATE_VERSION = 1
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_DATA_PTR = operator.methodcaller("data_ptr")
REGIMES = ("stochastic", "deterministic")
ENGINES = ("auto", "torch", "native")

_NO_LOSS = (
    "elra: step() got no loss: running without loss-based decisions (every step with a finite "
    "gradient is accepted, a non-finite gradient retraces; no loss statistics, no accept test, "
    "no batch growth from stalled losses). ELRA decides better with the loss: call "
    "optimizer.set_loss(loss) before a bare step() (accelerate, Trainer-style loops), or pass "
    "optimizer.step(loss) or optimizer.step(closure), or use ElraGradScaler. Said once."
)
_NAN = float("nan")


def _loss_to_float(loss: Any, what: str = "loss") -> float:
    """A loss given as a number, a one-element tensor or array, as a Python float."""
    if isinstance(loss, (str, bytes, bool)) or loss is None:
        raise TypeError(f"{what} must be a number or a one-element tensor, "
                        f"got {type(loss).__name__}: {loss!r}")
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"{what} must be a single value, got a tensor of shape {tuple(loss.shape)}; "
                f"reduce it first (e.g. loss.mean())")
        if loss.is_complex():
            raise TypeError(f"{what} must be real, got a complex tensor")
        return float(loss.detach().reshape(()))
    if isinstance(loss, numbers.Real):
        return float(loss)
    if hasattr(loss, "__float__"):
        try:
            return float(loss)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what} must be a single value: {e}") from None
    raise TypeError(f"{what} must be a number or a one-element tensor, got {type(loss).__name__}")


def _mode_name(mode: Any) -> str:
    name = getattr(mode, "name", mode)
    if not isinstance(name, str):
        raise TypeError(f"mode must be 'P2M', got {mode!r}")
    key = name.strip().lower()
    if key in ("p2m", "p2min"):
        return "P2M"
    if key in ("c2m", "c2min"):
        raise ValueError("mode C2M was discontinued by ELRA's authors; only P2M exists "
                         "(leave mode at its default)")
    raise ValueError(f"unknown ELRA mode {mode!r}; the only mode is 'P2M'")


class ElraOptimizer(torch.optim.Optimizer):
    """ELRA/P2M: gradient descent that sets its own step size from the angle of consecutive
    gradients, retraces failed steps, grows its batch and controls its weight decay.

    The positional order matches the reference package, so ``ElraOptimizer(params, model,
    batch_size, classes, lr=..., weight_decay=...)`` works unchanged.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``. Groups may
            carry their own ``weight_decay``. Parameters must be real floating point tensors
            (float16/bfloat16/float32/float64); one group must live on one device. Raises
            ``TypeError``/``ValueError`` otherwise.
        model: optional module, used by :meth:`get_boost_model` when no model is passed there.
        batch_size: mini-batch size (samples per ``step``); shapes the long control window.
            Default 8; 0 means the default.
        classes: number of classes of a classification task, as in the reference: ``classes > 1``
            selects the stochastic regime, otherwise deterministic; ``log(classes)`` bounds the
            initial loss estimate. Prefer ``regime``.
        lr: the first step length along the gradient (default 1e-5); ELRA grows or shrinks it by
            itself within a few steps. Must be finite and > 0.
        mode: only ``"P2M"`` (also ``"p2min"``); ``"C2M"`` was discontinued and raises.
        dummy: accepted and ignored (positional compatibility with the reference).
        momentum: optional momentum ``beta`` in [0, 1); ``None`` or 0 turns it off (default).
        weight_decay: decay in [0, 0.1) (e.g. 1e-4), or a keep factor > 0.5 read as ``1 - value``
            (0.9999 means 1e-4). ELRA scales it with the gradient size and, once
            :meth:`set_valid_loss` and :meth:`set_train_loss` were called, replaces it by its own
            factor from the train/validation gap.
        warmup: number of steps over which the stochastic step ramps up (default 1: none).
        regime: ``"stochastic"`` for mini-batch training of networks (the applied step is a damped,
            scheduled ``lr``; retrace, batch growth and weight-decay control active) or
            ``"deterministic"`` for full-batch problems (the applied step is ``alpha`` itself).
            Default ``None`` chooses by ``classes`` when given, else ``"stochastic"`` when
            ``warmup > 1`` (warm-up only exists there), else ``"deterministic"`` with a warning,
            because the deterministic regime barely trains a network on mini-batches.
        collects: initial number of calls whose gradients are averaged into one step (default 1);
            ELRA doubles it by itself when progress stalls.
        engine: ``"auto"`` (default: the fused native kernels when they are built for the
            parameters' device, else pure torch), ``"torch"`` or ``"native"`` (raises
            ``RuntimeError`` when the native kernels cannot run here). ``engine_name`` and
            :func:`elra.native_status` tell which is used and why.
        process_group: the ranks that train together (data parallel): the loss of every call
            (and the validation/training losses) is averaged over them in one small all-reduce,
            so that all ranks take the same decisions and, with gradients averaged by
            ``DistributedDataParallel``, bit-identical steps. ``"auto"`` (default): the world
            group when ``torch.distributed`` is initialised, else none; ``None``: every process
            decides alone; or a ``ProcessGroup``. Every rank must then call ``step`` /
            ``step_retrace`` together (they are collective). ``TypeError`` for another type,
            ``ValueError`` for another string or a group this process is not in,
            ``RuntimeError`` for a group while ``torch.distributed`` is not initialised.
        sharded: whether this process holds only a shard of the parameters, so that the dot
            products and norms of a step are summed over the process group. ``None`` (default):
            ``True`` for ``DTensor`` parameters (FSDP2 ``fully_shard``), else ``False``. Pass
            ``True`` under ``torch.distributed.optim.ZeroRedundancyOptimizer`` (through its
            keyword arguments: ``ZeroRedundancyOptimizer(params, optimizer_class=ElraOptimizer,
            sharded=True, ...)``). ``ValueError`` for ``True`` without a process group, for
            ``False`` with sharded ``DTensor`` parameters, and for a mix of ``DTensor`` and
            plain parameters.

    A step needs the loss: ``step(loss)``, ``step(closure)``, :meth:`set_loss` before a bare
    ``step()``, or :class:`ElraGradScaler`; without any, the step is taken without loss-based
    decisions (see :meth:`step`). ``param_groups[i]["lr"]`` always shows the step length
    currently applied; changes made to it from outside (LR schedulers) are ignored with one
    warning.
    """

    def __init__(self, params: Iterable, model: Optional[torch.nn.Module] = None,
                 batch_size: int = 8, classes: Optional[int] = None, lr: float = 1e-5,
                 mode: Any = "P2M", dummy: Any = None, momentum: Optional[float] = None,
                 weight_decay: float = 0.0, warmup: int = 1, *, regime: Optional[str] = None,
                 collects: int = 1, engine: str = "auto", process_group: Any = AUTO,
                 sharded: Optional[bool] = None):
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self.mode = _mode_name(mode)
        wd = normalize_weight_decay(weight_decay)
        batch_size = _int_arg("batch_size", batch_size, 0) or 8
        if classes is not None:
            classes = _int_arg("classes", classes, 0)
        warmup = _int_arg("warmup", warmup, 0)
        collects = _int_arg("collects", collects, 1)
        if collects > MAX_COLLECTS:
            raise ValueError(f"collects must be at most {MAX_COLLECTS}, got {collects}")
        if momentum is None:
            momentum = 0.0
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be None or a number in [0, 1), got {momentum!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if sharded is not None and not isinstance(sharded, bool):
            raise TypeError(f"sharded must be None, True or False, got {sharded!r}")
        stochastic = self._resolve_regime(regime, classes, warmup)
        self._group = resolve_process_group(process_group)
        if sharded and self._group is None and process_group is None:
            raise ValueError("sharded=True needs the process group over which the shards add "
                             "up; process_group=None was given")
        self._agreement = LossAgreement(self._group) if self._group is not None else None
        self._sharded_arg = sharded
        self._ready = False
        self._model = model
        self._lr_group_warned = False
        super().__init__(params, {"lr": float(lr), "weight_decay": wd})
        self._config = {"momentum": float(momentum), "engine": engine}
        self._control = LossControl(stochastic=stochastic, batch_size=batch_size,
                                    classes=classes or 0, warmup=warmup, collects=collects)
        self._losses: list[float] = []
        self._recorded = [0.0, 0]  # set_loss: sum and count of the losses recorded for the next step
        self._pending_valid: Optional[float] = None  # set_valid_loss / set_train_loss in a group:
        self._pending_train: Optional[float] = None  # averaged at the next call
        self._no_loss_logged = False
        self._replicas_checked = False
        self._extra_holder: dict = {}  # see [note: checkpoints through ZeroRedundancyOptimizer]
        self._adopted_holder: Optional[dict] = None
        self._shown_lr = float(lr)
        self._scheduler_warned = False
        self._booster: Optional[Booster] = None
        self.last_outcome = "none"
        self._pending = None
        self._engine: Engine
        self._buffers: list[FlatBuffer] = []
        self._build(alpha=float(lr), lr=INITIAL_LR)
        if self._publish_extra:
            for g in self.param_groups:
                g["elra"] = self._extra_holder
        self._ready = True

    # --- construction -------------------------------------------------------------------------
    @staticmethod
    def _resolve_regime(regime: Optional[str], classes: Optional[int], warmup: int) -> bool:
        if regime is not None:
            if regime not in REGIMES:
                raise ValueError(f"regime must be one of {REGIMES} or None, got {regime!r}")
            return regime == "stochastic"
        if classes is not None:
            return classes > 1
        if warmup > 1:
            logger.info("elra: warmup=%d given, using the stochastic regime", warmup)
            return True
        warnings.warn(
            "ElraOptimizer: no regime chosen, using the deterministic (full-batch) regime as the "
            "reference package does by default. For mini-batch training pass "
            "regime='stochastic' (or classes=<number of classes>); pass regime='deterministic' "
            "to keep this choice without the warning.", UserWarning, stacklevel=3)
        return False

    @property
    def regime(self) -> str:
        """``"stochastic"`` or ``"deterministic"``."""
        return "stochastic" if self._control.stochastic else "deterministic"

    @property
    def engine_name(self) -> str:
        """The engine doing the vector work (``"torch"`` or ``"native"``)."""
        return self._engine.name

    @property
    def process_group(self):
        """The process group the ranks agree over, or ``None`` (one process decides alone)."""
        return self._group

    @property
    def sharded(self) -> bool:
        """Whether this process optimizes a shard (reductions summed over the group)."""
        return self._sharded

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (e.g. with its own ``weight_decay``); same rules as the constructor."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, "
                            "not sets")
        else:
            params = list(params) if params is not None else []
        group["params"] = params
        devices = set()
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"ElraOptimizer can only optimize Tensors, got {type(p).__name__}")
            if p.is_complex():
                raise TypeError("ElraOptimizer does not support complex parameters "
                                f"(dtype {p.dtype}); view them as real with torch.view_as_real")
            if not p.is_floating_point():
                raise TypeError(f"ElraOptimizer can only optimize floating point parameters, "
                                f"got dtype {p.dtype}")
            if p.is_sparse or p.layout != torch.strided:
                raise TypeError(f"ElraOptimizer needs dense parameters, got layout {p.layout}")
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError("all parameters of one group must be on one device, got "
                             f"{sorted(str(d) for d in devices)}; put them in separate groups")
        if len(set(map(id, params))) != len(params):
            raise ValueError("a parameter group contains the same parameter twice")
        if "weight_decay" in group:
            group["weight_decay"] = normalize_weight_decay(group["weight_decay"])
        if "lr" in group and group["lr"] != self.defaults.get("lr") and not self._lr_group_warned:
            self._lr_group_warned = True
            warnings.warn("ElraOptimizer uses one step length for all parameters; the 'lr' of a "
                          "parameter group is ignored", UserWarning, stacklevel=2)
        group.pop("lr", None)
        super().add_param_group(group)
        if self._ready:
            self.param_groups[-1]["lr"] = self._shown_lr
            if self._publish_extra:
                self.param_groups[-1]["elra"] = self._extra_holder
            self._rebuild()

    def _trainable(self) -> list[tuple[int, torch.nn.Parameter]]:
        return [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"]
                if p.requires_grad]

    def _watch_layout(self) -> None:
        """Remember the groups' parameters, which are trainable, and where their data lives."""
        self._watch = [p for g in self.param_groups for p in g["params"]]
        self._watch_trainable = list(map(_REQUIRES_GRAD, self._watch))
        # DTensor parameters: where the local shard lives (their own data_ptr() is 0)
        self._ptr_of = _local_ptr if any(b.mirror for b in self._buffers) else _DATA_PTR
        self._watch_ptrs = [self._ptr_of(p) for p in self._watch if p.requires_grad]

    def _layout_changed(self) -> bool:
        """True if a parameter was added, removed, frozen or unfrozen, or its data replaced
        (``model.to(...)``, ``p.data = ...``) since the layout was built (C-level loops: this
        runs on every step)."""
        params = [p for g in self.param_groups for p in g["params"]]
        if len(params) != len(self._watch) or any(map(operator.is_not, params, self._watch)):
            return True
        trainable = list(map(_REQUIRES_GRAD, params))
        if trainable != self._watch_trainable:
            return True
        return list(map(self._ptr_of, compress(params, trainable))) != self._watch_ptrs

    def _build(self, alpha: float, lr: float) -> None:
        """Lay out the trainable parameters in flat buffers and create the engine."""
        trainable = self._trainable()
        if not trainable:
            raise ValueError("ElraOptimizer got no trainable parameters (all have "
                             "requires_grad=False)")
        self._setup_sharding([p for _, p in trainable])
        by_key: dict[tuple, list] = {}
        for gi, p in trainable:
            by_key.setdefault((p.device, p.dtype), []).append((gi, p))
        self._buffers = [FlatBuffer([p for _, p in items], [gi for gi, _ in items],
                                    mirror=self._mirror) for items in by_key.values()]
        self._engine = self._make_engine(alpha, lr, self._control.stochastic,
                                         self._config["momentum"])
        if self._control.collects > 1:  # so that a checkpoint template has the buffer (DCP)
            self._engine.ensure_collection()
        self._owned_ids = {id(p) for b in self._buffers for p in b.params}
        if self._booster is not None:
            self._booster = Booster(self._buffers, self._booster.cycle)
        self._watch_layout()
        self._refresh_state_views()

    def _setup_sharding(self, params: list) -> None:
        """Decide how this process's parameters relate to the other ranks' (see
        :mod:`elra.distributed`): replicated (DDP, one process), a ZeRO shard, or DTensor
        shards (FSDP2), and over which group the engine sums its reductions."""
        dtensors = [is_dtensor(p) for p in params]
        self._mirror = any(dtensors)
        if self._mirror:
            if not all(dtensors):
                raise ValueError("ElraOptimizer: DTensor parameters (FSDP2) and plain tensors "
                                 "cannot be mixed in one optimizer; shard the whole model with "
                                 "fully_shard or use one optimizer per kind")
            reduce_group = dtensor_shard_group(params)
            if self._sharded_arg is False and reduce_group is not None:
                raise ValueError("sharded=False, but the parameters are sharded DTensors (FSDP2); "
                                 "leave sharded at None")
            self._sharded = reduce_group is not None
        else:
            self._sharded = bool(self._sharded_arg)
            reduce_group = self._group if self._sharded else None
            if self._sharded and self._group is None and not _distributed_single_rank():
                raise ValueError("sharded=True needs torch.distributed to be initialised (the "
                                 "shards are summed over the process group)")
        self._reducer = sum_reducer(reduce_group) if reduce_group is not None else None
        # ZeRO keeps the optimizer's groups, not its state_dict (see _adopt_external_load)
        self._publish_extra = self._sharded and not self._mirror

    def _make_engine(self, alpha: float, lr: float, stochastic: bool, momentum: float) -> Engine:
        choice = self._config["engine"]
        kw = dict(stochastic=stochastic, momentum=momentum, alpha=alpha, lr=lr,
                  reducer=self._reducer, num_groups=len(self.param_groups))
        if choice != "torch":
            extra = len(self.param_groups) if self._reducer is not None else 0
            reason = NativeEngine.supports(self._buffers, extra)
            if reason is None:
                engine: Engine = NativeEngine(self._buffers, **kw)
            elif choice == "native":
                raise RuntimeError(f"engine='native' was asked for, but {reason}; use "
                                   f"engine='auto' or 'torch'")
            else:
                engine = TorchEngine(self._buffers, **kw)
                logger.info("elra: using the pure-torch engine: %s", reason)
        else:
            engine = TorchEngine(self._buffers, **kw)
        if engine.name != getattr(self, "_logged_engine", None):
            self._logged_engine = engine.name
            logger.info("elra: %s engine on %s", engine.name,
                        ", ".join(sorted({str(b.device) for b in self._buffers})))
        return engine

    def _vector_views(self) -> dict[str, dict[torch.nn.Parameter, torch.Tensor]]:
        """Every per-parameter state vector, by name, as views of the flat state buffers."""
        out: dict[str, dict] = {}
        vecs = self._engine.vectors()
        if self._booster is not None:
            vecs["boost_average"] = self._booster.average
        for name, flats in vecs.items():
            m = out.setdefault(name, {})
            for buf, flat in zip(self._buffers, flats):
                if flat is None:
                    continue
                for p, v in zip(buf.params, buf.views(flat)):
                    m[p] = v
        return out

    def _refresh_state_views(self) -> None:
        self.state.clear()
        for name, m in self._vector_views().items():
            for p, v in m.items():
                self.state[p][name] = v
        first = self._buffers[0].params[0]
        self._first_state = (first, self.state[first])  # to notice a state replaced from outside
        self._shown_direction = self._engine.direction
        self._direction_views: dict[tuple, list] = {}

    def _sync_direction_views(self) -> None:
        """Point ``state[p]["direction"]`` at the buffer the engine uses now.

        The native engine alternates between two direction buffers (see engine_native.py); the
        views of both and each parameter's state dict are looked up once, so a swap costs one
        plain dict assignment per parameter.
        """
        flats = self._engine.direction
        if flats is self._shown_direction:
            return
        key = tuple(id(t) for t in flats)
        pairs = self._direction_views.get(key)
        if pairs is None:
            pairs = [(self.state[p], v) for buf, flat in zip(self._buffers, flats)
                     for p, v in zip(buf.params, buf.views(flat))]
            self._direction_views[key] = pairs
        for entry, v in pairs:
            entry["direction"] = v
        self._shown_direction = flats

    def _rebuild(self) -> None:
        """Rebuild the layout after the parameter set changed, carrying all state over."""
        old_views = self._vector_views()
        old_engine, old_booster = self._engine, self._booster
        collected = old_engine.collected is not None
        self._build(old_engine.scalars.alpha, old_engine.scalars.lr)
        self._engine.load_scalar_state(old_engine.scalar_state())
        if collected:
            self._engine.ensure_collection()
            self._engine.collected_count = old_engine.collected_count
        if old_booster is not None:
            self._booster.load_state(old_booster.state())
        self._refresh_state_views()
        for name, m in self._vector_views().items():
            for p, v in m.items():
                old = old_views.get(name, {}).get(p)
                if old is not None:
                    v.copy_(old)
        logger.info("elra: parameter layout rebuilt (%d buffers, %d elements)",
                    len(self._buffers), sum(b.numel for b in self._buffers))

    # --- per step -----------------------------------------------------------------------------
    def _begin_call(self) -> None:
        if self._publish_extra:
            self._adopt_external_load()
        if self._layout_changed():
            self._rebuild()
        shown = self._shown_lr
        if any(g["lr"] != shown for g in self.param_groups):
            if not self._scheduler_warned:
                self._scheduler_warned = True
                warnings.warn("ElraOptimizer sets its own step length; a change of "
                              "param_groups[...]['lr'] (e.g. by an LR scheduler) is ignored",
                              UserWarning, stacklevel=3)
            for g in self.param_groups:
                g["lr"] = shown
        if self._mirror:
            for b in self._buffers:
                b.pull()

    def _end_call(self) -> None:
        if self._mirror:
            for b in self._buffers:
                b.push()
        self._sync_direction_views()
        self._publish_lr()

    def _publish_lr(self) -> None:
        s = self._engine.step_size if self._control.started else self._shown_lr
        self._shown_lr = float(s)
        for g in self.param_groups:
            g["lr"] = self._shown_lr

    def _agree(self, f: Optional[float], requested: bool,
               no_gradient: bool) -> tuple[Optional[float], bool, bool]:
        """The loss and flags all ranks decide from (see :mod:`elra.distributed`); as given
        without a process group."""
        agreement = self._agreement
        if agreement is None:
            return f, requested, no_gradient
        if not self._replicas_checked and not self._sharded:
            self._replicas_checked = True
            sq = sum(float(torch.linalg.vector_norm(b.data.float())) ** 2 for b in self._buffers)
            agreement.check_replicated(sum(b.numel for b in self._buffers), sq)
        a = agreement.agree(f, requested, no_gradient, self._pending_valid, self._pending_train)
        self._pending_valid = self._pending_train = None
        if a.valid_loss is not None:
            self._control.valid_loss = a.valid_loss
        if a.train_loss is not None:
            self._control.train_loss = a.train_loss
        return a.loss, a.retrace_requested, a.no_gradient

    def set_loss(self, loss: Union[float, torch.Tensor]) -> None:
        """Record the loss of the current mini-batch for the next bare ``step()``.

        For training loops that call ``optimizer.step()`` without arguments (Hugging Face
        accelerate, Trainer-style loops): ``loss.backward(); optimizer.set_loss(loss);
        optimizer.step()``. Called several times before a step (gradient accumulation: once per
        micro-batch), the step uses the mean of the recorded losses. A step given its loss
        directly (``step(loss)``, a closure) discards recorded losses. ``loss`` is a number or a
        one-element tensor (``TypeError``/``ValueError`` otherwise); NaN/inf are allowed and make
        the step a retrace. The value is read at once (a device sync for a GPU tensor, as
        ``step(loss)`` does).
        """
        f = _loss_to_float(loss)
        self._recorded[0] += f
        self._recorded[1] += 1

    def _take_recorded(self) -> Optional[float]:
        total, n = self._recorded
        self._recorded = [0.0, 0]
        return total / n if n else None

    @torch.no_grad()
    def step(self, loss: Union[float, torch.Tensor, Callable, None] = None,
             scale: Optional[float] = None, closure: Optional[Callable] = None, *,
             retrace: bool = False):
        """Take one ELRA step (or collect one gradient) given this call's loss.

        Args:
            loss: the loss of the current mini-batch at the current parameters, as a float or a
                one-element tensor (``loss.item()`` is fine); or a closure (also accepted as
                ``closure=``) that zeroes gradients, computes the loss, calls ``backward()`` and
                returns it. A NaN/inf loss makes the step a retrace (like :meth:`step_retrace`).
                ``None``: the mean of the losses recorded by :meth:`set_loss` since the last
                step; if there are none, the step is taken without a loss: it is accepted if its
                gradient is finite (else a retrace), and no loss statistics or loss-based
                decisions are made for it (logged once, at WARNING, on the ``elra`` logger).
            scale: the factor the gradients are multiplied by (loss scaling); ELRA divides by it
                once. ``None`` means 1. Must be finite and > 0.
            retrace: ``True`` makes the call :meth:`step_retrace` with this loss (the gradient is
                not used): for wrappers that only forward ``step`` (e.g.
                ``ZeroRedundancyOptimizer.step(loss, retrace=True)``).

        Returns the loss (the closure's result when a closure was given).
        Raises ``TypeError`` when the loss is not a number, ``ValueError`` for a tensor of
        several elements. A non-finite or missing gradient never reaches the parameters: the
        step becomes a retrace. ``last_outcome`` tells what the call did. With a process group
        (see the constructor) the call is collective and every rank decides from the mean loss.
        """
        if closure is not None and not callable(closure):
            # wrappers such as ZeroRedundancyOptimizer forward their positional argument as
            # closure=...; a loss value there is still a loss value
            if loss is not None:
                raise TypeError("pass either a loss or a closure to step(), not both")
            loss, closure = closure, None
        if loss is not None and callable(loss) and not isinstance(loss, torch.Tensor):
            if closure is not None:
                raise TypeError("pass either a loss or a closure to step(), not both")
            loss, closure = None, loss
        if closure is not None:
            if loss is not None:
                raise TypeError("pass either a loss or a closure to step(), not both")
            with torch.enable_grad():
                loss = closure()
        if retrace:
            self.step_retrace(_NAN if loss is None else loss)
            return loss
        if loss is None:
            f = self._take_recorded()
        else:
            f = _loss_to_float(loss)
            self._recorded = [0.0, 0]
        inv = 1.0
        if scale is not None:
            s = _loss_to_float(scale, "scale")
            if not (math.isfinite(s) and s > 0.0):
                raise ValueError(f"scale must be finite and > 0, got {scale!r}")
            inv = 1.0 / s
        self._begin_call()
        self._resolve()
        present = sum(b.sync_grads() for b in self._buffers)
        f, requested, no_gradient = self._agree(f, False, present == 0)
        if requested:
            self._fail(f, with_gradient=False, reason="retrace_requested")
        else:
            self._step(f, inv, no_gradient)
        self._end_call()
        return loss

    def _step(self, f: Optional[float], inv: float, no_gradient: bool) -> None:
        ctl, eng = self._control, self._engine
        if f is not None and not math.isfinite(f):
            return self._fail(f, with_gradient=False, reason="retrace_loss")
        if no_gradient:
            return self._fail(f, with_gradient=False, reason="retrace_no_gradient")
        if f is None and not self._no_loss_logged:
            self._no_loss_logged = True
            logger.warning(_NO_LOSS)
        use_collected = ctl.collects > 1
        f_best = f
        if use_collected:
            if eng.collected is None:  # the batch just grew: the collection needs its buffer
                eng.ensure_collection()
                self._refresh_state_views()
            if not eng.collect(1.0 / ctl.collects, inv):
                return self._fail(f, with_gradient=True, reason="retrace_gradient")
            if f is not None:
                self._losses.append(f)
            if eng.collected_count < ctl.collects:
                self.last_outcome = "collected"
                return
            f_best = min(self._losses) if self._losses else None
            self._losses = []
            inv = 1.0
        if f is None:
            f_best = None
        fv = _NAN if f is None else f  # what the engine and boosting see of a missing loss
        decays = [g["weight_decay"] for g in self.param_groups]
        if not ctl.started:
            before = ctl.to_dict()
            wd = ctl.weight_decay_coefficients(decays)
            ctl.begin_step(with_gradient=True)
            if f is None:
                ctl.first_step_without_loss()
            else:
                ctl.first_step(f)
            self._settle(eng.first_step(use_collected, inv, wd, self._booster, fv),
                         ("first", before), fv)
            eng.drop_collection()
            return
        if ctl.begin_step(with_gradient=True):
            self._close_window()
        if f is None:
            snap, f_last = ctl.snapshot(), ctl.f_last
            wd = ctl.weight_decay_coefficients(decays)
            inputs = ctl.accept_without_loss()
        else:
            tentative = ctl.accept_test(f_best, f)
            if tentative is None:
                return self._retrace(f, "retrace_loss")
            wd = ctl.weight_decay_coefficients(decays)
            snap, f_last = ctl.snapshot(), ctl.f_last
            inputs = ctl.accept(tentative, f)
        done = eng.accept_step(use_collected, inv, wd, inputs, fv, f_last, self._booster)
        self._settle(done, ("accept", snap), fv)
        eng.drop_collection()

    def _settle(self, done: Optional[bool], undo: tuple, f: float) -> None:
        """Record the engine's outcome of a step; undo the host's optimistic commit if the
        gradient was not finite (the engine has then already retraced, or not moved at all)."""
        kind = undo[0]
        if done is None:  # a device engine tells later (see _resolve)
            self._pending = (undo, f)
            self.last_outcome = kind if kind == "first" else "accepted"
            return
        self._pending = None
        if done:
            self.last_outcome = "first" if kind == "first" else "accepted"
            return
        ctl = self._control
        if kind == "first":
            self._control = LossControl.from_dict(undo[1])
            logger.warning("elra: the first step failed (non-finite gradient); parameters "
                           "unchanged")
        else:
            ctl.restore(undo[1])
            ctl.retrace()
            logger.debug("elra: retrace (non-finite gradient) at step %d", ctl.steps)
        self.last_outcome = "retrace_gradient"

    def _resolve(self) -> None:
        """Settle a step whose outcome the engine reported late; before any new decision."""
        if self._pending is not None:
            undo, f = self._pending
            done = self._engine.resolve()
            self._settle(True if done is None else done, undo, f)

    def _fail(self, f: Optional[float], with_gradient: bool, reason: str) -> None:
        """A call whose gradient cannot be used: a retrace (nothing to undo before the start)."""
        f = _NAN if f is None else f
        self._engine.drop_collection()
        self._losses = []
        if not self._control.started:
            logger.warning("elra: the first step failed (%s, loss %r); parameters unchanged",
                           reason, f)
            self.last_outcome = reason
            return
        if self._control.begin_step(with_gradient):
            self._close_window()
        self._retrace(f, reason)

    def _retrace(self, f: float, reason: str) -> None:
        ctl = self._control
        self._engine.retrace(f, ctl.f_last)
        ctl.retrace()
        self._engine.drop_collection()
        self._losses = []
        self.last_outcome = reason
        logger.debug("elra: retrace (%s) at step %d, loss %r", reason, ctl.steps, f)

    def _close_window(self) -> None:
        norm_sum, mean_angle, min_angle = self._engine.window_sums()
        wd_on = any(g["weight_decay"] > 0.0 for g in self.param_groups)
        self._control.close_window(norm_sum, mean_angle, min_angle, wd_on)
        self._engine.set_grad_norm_avg(self._control.grad_norm_avg)
        logger.debug("elra: window at step %d: schedule %.3f, collects %d, grad_norm_avg %.4g",
                     self._control.steps, self._control.schedule, self._control.collects,
                     self._control.grad_norm_avg)

    def step_retrace(self, loss: Union[float, torch.Tensor]) -> None:
        """Declare the current point failed without using (or needing) its gradient.

        Use it when the loss is clearly too high or not finite: ``backward()`` can be skipped.
        The optimizer goes back to the last accepted point and re-applies the last direction
        with a smaller step. Any partial gradient collection is dropped. ``loss`` may be NaN.
        With a process group it is collective like :meth:`step`: when any rank calls it (the
        others calling ``step``), all ranks retrace. Under ``DistributedDataParallel`` call
        ``backward()`` on every rank all the same (DDP's gradient all-reduce needs all ranks).
        """
        f = _loss_to_float(loss)
        self._recorded = [0.0, 0]
        self._begin_call()
        self._resolve()
        with torch.no_grad():
            f, _, _ = self._agree(f, True, False)
            self._fail(f, with_gradient=False, reason="retrace_requested")
            self._end_call()

    # --- weight-decay control and boosting ------------------------------------------------------
    def set_valid_loss(self, loss: Union[float, torch.Tensor], *_ignored: Any, **_kw: Any) -> None:
        """Record a validation loss (e.g. once per epoch) for the dynamic weight decay.

        With both :meth:`set_valid_loss` and :meth:`set_train_loss` given and a non-zero weight
        decay, ELRA decays harder while the validation loss exceeds the training loss. Extra
        arguments of the reference's signature are accepted and ignored. Raises ``ValueError``
        for a non-finite loss. With a process group the value is averaged, at the next
        ``step``, over the ranks that recorded one (no collective here: a rank may skip it).
        """
        v = _finite_loss(loss, "validation loss")
        if self._agreement is None:
            self._control.valid_loss = v
        else:
            self._pending_valid = v

    def set_train_loss(self, loss: Union[float, torch.Tensor], *_ignored: Any, **_kw: Any) -> None:
        """Record a training loss (e.g. the epoch mean) for the dynamic weight decay; averaged
        over the process group at the next ``step`` like :meth:`set_valid_loss`."""
        v = _finite_loss(loss, "training loss")
        if self._agreement is None:
            self._control.train_loss = v
        else:
            self._pending_train = v

    def get_boost_model(self, enable: bool = True, model: Optional[torch.nn.Module] = None,
                        device: Any = None):
        """Turn boosting on or off and get the averaged model.

        Boosting keeps an equal-weight running average of the accepted points; it never changes
        the optimizer's path. Each call that returns a model restarts the average, so calling
        it once per epoch averages each epoch.

        Returns ``(count, avg_loss, model_copy)``: the number of points averaged, the mean of
        their losses (NaN if none) and a deep copy of ``model`` (or of the constructor's
        ``model``) holding the average, on ``device`` if given. ``model_copy`` is ``None`` when
        boosting was off until now, nothing was averaged yet, or no model is known.
        ``enable=False`` turns boosting off and frees its buffer. Not available for sharded
        parameters (ZeRO, FSDP2: no rank holds the whole model): ``enable=True`` raises
        ``NotImplementedError`` there.
        """
        if enable and self._sharded:
            raise NotImplementedError("boosting needs the whole model on this process; it is not "
                                      "available for sharded parameters (ZeRO, FSDP2)")
        if not enable:
            self._booster = None
            self._refresh_state_views()
            return 0, float("nan"), None
        if self._booster is None:
            self._booster = Booster(self._buffers)
            self._refresh_state_views()
            return 0, float("nan"), None
        b = self._booster
        count, avg_loss = b.count, b.avg_loss
        model = model if model is not None else self._model
        if count == 0 or model is None:
            return count, avg_loss, None
        copy_ = b.model_copy(self._buffers, model, torch.device(device) if device else None)
        b.restart()
        return count, avg_loss, copy_

    # --- gradients ------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients.

        The gradients of the optimized parameters are views of one flat buffer; they are zeroed
        in place and stay attached (``p.grad`` is a zero tensor, not ``None``, whatever
        ``set_to_none`` says), so the next ``backward()`` accumulates straight into the buffer.
        Other parameters of the groups (frozen ones), and DTensor parameters (FSDP2, whose
        gradients the optimizer copies in at each step), follow ``set_to_none``.
        """
        for b in self._buffers:
            b.zero_grad(set_to_none)
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) not in self._owned_ids and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()

    # --- state ----------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "momentum": self._config["momentum"],
            "control": self._control.to_dict(),
            "engine": self._engine.scalar_state(),
            "collected_losses": list(self._losses),
            "boost": self._booster.state() if self._booster is not None else None,
            "shown_lr": self._shown_lr,
            "last_outcome": self.last_outcome,
            "recorded_loss": list(self._recorded),
            "pending_losses": [self._pending_valid, self._pending_train],
        }

    def state_dict(self) -> dict:
        """The complete state: per-parameter vectors (views of the flat buffers) under
        ``state`` and the optimizer's scalars under the key ``"elra"`` of every parameter group.

        Only tensors, numbers, strings, lists and dicts: ``torch.load(weights_only=True)``
        reads it. Calling it changes nothing (beyond waiting for a device's last step).
        For DTensor parameters (FSDP2) the vectors are DTensors laid out like their parameters,
        as ``torch.distributed.checkpoint`` expects.
        """
        self._resolve()
        if self._publish_extra:
            self._adopt_external_load()
        sd = super().state_dict()
        extra = self._extra_state()
        for g in sd["param_groups"]:
            g["elra"] = copy.deepcopy(extra)
        if self._mirror:
            params = [p for g in self.param_groups for p in g["params"]]
            for i, entry in sd["state"].items():
                p = params[i]
                if is_dtensor(p):
                    sd["state"][i] = {k: as_dtensor_like(v, p) for k, v in entry.items()}
        if self._publish_extra:  # in place: ZeroRedundancyOptimizer's groups share the dict
            self._extra_holder.clear()
            self._extra_holder.update(copy.deepcopy(extra))
        return sd

    # [note: checkpoints through ZeroRedundancyOptimizer]
    # ZeRO's consolidate_state_dict() calls this optimizer's state_dict() on every rank, but its
    # own state_dict() keeps only the per-parameter "state" of those and takes the parameter
    # groups from its own copies, which it syncs from this optimizer's groups; its
    # load_state_dict() assigns this optimizer's per-parameter state directly and syncs the
    # saved groups back, without calling load_state_dict() here. So, with sharded=True and
    # plain parameters, every group carries the key "elra": one dict that state_dict() refreshes
    # in place (ZeRO's groups hold the same dict, so its consolidated state has the scalars),
    # and a call that finds another dict there, or the per-parameter state replaced, loads
    # what it finds through load_state_dict() (_adopt_external_load).
    def _adopt_external_load(self) -> None:
        groups = self.param_groups
        held = groups[0].get("elra") if groups else None
        replaced = self._first_state is not None and \
            self.state.get(self._first_state[0]) is not self._first_state[1]
        if not replaced and (held is self._extra_holder or held is self._adopted_holder):
            if held is not self._extra_holder:  # ZeRO synced an adopted dict back: ours again,
                for g in groups:  # so that ZeRO takes ours after this step
                    g["elra"] = self._extra_holder
            return
        if not isinstance(held, dict) or held is self._extra_holder or not held:
            raise RuntimeError("the optimizer's per-parameter state was replaced without ELRA's "
                               "scalars (the 'elra' entry of the parameter groups): load a "
                               "state saved by ElraOptimizer (or ZeroRedundancyOptimizer "
                               "around it) with load_state_dict")
        params = [p for g in groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        trainable = {id(p) for _, p in self._trainable()}
        sd = {"state": {index[id(p)]: dict(self.state[p]) for p in params
                        if id(p) in trainable and p in self.state},
              "param_groups": [dict(g, params=[index[id(p)] for p in g["params"]])
                               for g in groups]}
        self.load_state_dict(sd)
        self._adopted_holder = held
        for g in groups:
            g["elra"] = self._extra_holder
        logger.info("elra: adopted a state loaded from outside (ZeroRedundancyOptimizer)")

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`.

        Everything is checked before anything changes: a state of another version, another
        number of groups or parameters, other shapes, or another set of trainable parameters
        raises ``ValueError`` and leaves the optimizer as it was.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or \
                "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict (needs 'state' and 'param_groups')")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state has {len(groups)} parameter groups, this optimizer "
                             f"has {len(self.param_groups)}")
        extra = groups[0].get("elra") if groups else None
        if not isinstance(extra, dict):
            raise ValueError("the state was not saved by ElraOptimizer (no 'elra' entry)")
        if extra.get("version", 0) > STATE_VERSION:
            raise ValueError(f"the state has version {extra.get('version')}, newer than this "
                             f"elra ({STATE_VERSION}); upgrade elra")
        index: dict[int, torch.nn.Parameter] = {}
        i = 0
        for saved, mine in zip(groups, self.param_groups):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError("a parameter group of the state has "
                                 f"{len(saved['params'])} parameters, this one has "
                                 f"{len(mine['params'])}")
            for sid, p in zip(saved["params"], mine["params"]):
                index[sid] = p
                i += 1
        control = LossControl.from_dict(extra["control"])
        trainable = {id(p) for _, p in self._trainable()}
        saved_state = state_dict["state"]
        for sid, entry in saved_state.items():
            p = index.get(sid)
            if p is None:
                raise ValueError(f"the state has an entry for unknown parameter {sid!r}")
            if id(p) not in trainable:
                raise ValueError("the state holds state for a parameter that is frozen here: "
                                 "the parameter layout differs")
            for name, t in entry.items():
                if not isinstance(t, torch.Tensor) or not _state_fits(t, p):
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
        if saved_ids != trainable:
            raise ValueError(f"the state covers {len(saved_ids)} trainable parameters, this "
                             f"optimizer has {len(trainable)}: the parameter layout differs")
        try:
            momentum = float(extra.get("momentum", 0.0))
            engine = self._make_engine(1.0, INITIAL_LR, control.stochastic, momentum)
            engine.load_scalar_state(extra["engine"])
            booster = None
            if extra.get("boost") is not None:
                booster = Booster(self._buffers)
                booster.load_state(extra["boost"])
            decays = [normalize_weight_decay(g.get("weight_decay", 0.0)) for g in groups]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the ELRA state is incomplete or invalid: {e!r}") from None
        # --- checks passed: apply -----------------------------------------------------------------
        self._control = control
        self._config["momentum"] = momentum
        for saved, mine, wd in zip(groups, self.param_groups, decays):
            for k, v in saved.items():
                if k not in ("params", "elra"):
                    mine[k] = v
            mine["weight_decay"] = wd
        self._booster = booster
        self._engine = engine
        if any("collected" in e for e in saved_state.values()) or control.collects > 1:
            engine.ensure_collection()
            engine.collected_count = int(extra["engine"]["collected_count"])
        self._losses = [float(v) for v in extra.get("collected_losses", [])]
        rec = extra.get("recorded_loss", [0.0, 0])
        self._recorded = [float(rec[0]), int(rec[1])]
        pend = extra.get("pending_losses", [None, None])
        self._pending_valid, self._pending_train = (None if v is None else float(v) for v in pend)
        self._shown_lr = float(extra.get("shown_lr", self._shown_lr))
        self.last_outcome = str(extra.get("last_outcome", "none"))
        self._refresh_state_views()
        for sid, entry in saved_state.items():
            p = index[sid]
            for name, t in entry.items():
                if name in self.state[p]:
                    self.state[p][name].copy_(local_tensor(t) if is_dtensor(t) else t)
        for g in self.param_groups:
            g["lr"] = self._shown_lr


def _state_fits(t: torch.Tensor, p: torch.Tensor) -> bool:
    """A saved state tensor fits a parameter: same shape; for a DTensor parameter a DTensor of
    its shape whose local shard matches, or a plain tensor of the local shard's shape."""
    if not is_dtensor(p):
        return t.shape == p.shape and not is_dtensor(t)
    if is_dtensor(t):
        return t.shape == p.shape and local_tensor(t).shape == local_tensor(p).shape
    return t.shape == local_tensor(p).shape


def _local_ptr(p: torch.Tensor) -> int:
    return local_tensor(p).data_ptr()


def _distributed_single_rank() -> bool:
    """torch.distributed is initialised with one rank: nothing to sum over."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() == 1


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _finite_loss(loss: Any, what: str) -> float:
    f = _loss_to_float(loss, what)
    if not math.isfinite(f):
        raise ValueError(f"{what} must be finite, got {f}")
    return f
