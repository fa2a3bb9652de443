"""Checking what users pass to ``ElraOptimizer``: arguments, parameter groups and losses.

Every check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value)
with a message that says what was expected, before anything is changed.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from typing import Any, Optional

import torch

from .control import MAX_COLLECTS, normalize_weight_decay

logger = logging.getLogger("elra")
REGIMES = ("stochastic", "deterministic")
ENGINES = ("auto", "torch", "native")


def loss_to_float(loss: Any, what: str = "loss") -> float:
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


def finite_loss(loss: Any, what: str) -> float:
    f = loss_to_float(loss, what)
    if not math.isfinite(f):
        raise ValueError(f"{what} must be finite, got {f}")
    return f


def loss_scale(scale: Any) -> float:
    """``1 / scale`` of a loss scale (``None``: 1); the scale must be finite and > 0."""
    if scale is None:
        return 1.0
    s = loss_to_float(scale, "scale")
    if not (math.isfinite(s) and s > 0.0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    return 1.0 / s


def warn_once(warned: set, key: str, message: str, stacklevel: int) -> None:
    """A ``UserWarning`` the first time ``key`` comes up (``warned``: the keys so far)."""
    if key not in warned:
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)
    warned.add(key)


def loss_or_closure(loss: Any, closure: Any) -> tuple:
    """``step``'s ``(loss, closure)`` as given positionally or by keyword, sorted out: a
    callable is the closure, anything else the loss; both at once raise ``TypeError``."""
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
    if closure is not None and loss is not None:
        raise TypeError("pass either a loss or a closure to step(), not both")
    return loss, closure


def int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def mode_name(mode: Any) -> str:
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


def constructor_args(lr, batch_size, classes, momentum, weight_decay, warmup, regime, collects,
                     engine, sharded, process_group) -> dict:
    """The constructor's arguments, checked and normalised; ``control``: those of the control
    law (:class:`elra.control.LossControl`)."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    wd = normalize_weight_decay(weight_decay)
    batch_size = int_arg("batch_size", batch_size, 0) or 8
    if classes is not None:
        classes = int_arg("classes", classes, 0)
    warmup = int_arg("warmup", warmup, 0)
    collects = int_arg("collects", collects, 1)
    if collects > MAX_COLLECTS:
        raise ValueError(f"collects must be at most {MAX_COLLECTS}, got {collects}")
    momentum = 0.0 if momentum is None else momentum
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or \
            not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be None or a number in [0, 1), got {momentum!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if sharded is not None and not isinstance(sharded, bool):
        raise TypeError(f"sharded must be None, True or False, got {sharded!r}")
    if sharded and process_group is None:
        raise ValueError("sharded=True needs the process group over which the shards add up; "
                         "process_group=None was given")
    control = dict(stochastic=stochastic_regime(regime, classes, warmup), batch_size=batch_size,
                   classes=classes or 0, warmup=warmup, collects=collects)
    return dict(lr=float(lr), weight_decay=wd, momentum=float(momentum), control=control)


def stochastic_regime(regime: Optional[str], classes: Optional[int], warmup: int) -> bool:
    """Whether the regime is stochastic: ``regime`` when given, else by ``classes``, else by
    ``warmup > 1``, else deterministic with a warning (the reference's default)."""
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
        "to keep this choice without the warning.", UserWarning, stacklevel=4)
    return False


def param_group(param_group: Any, who: str = "ElraOptimizer") -> dict:
    """A parameter group, checked: dense real floating-point tensors on one device, each once;
    its ``weight_decay`` normalised (ELRA's convention). ``who``: the optimizer's name in
    the messages."""
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
            raise TypeError(f"{who} can only optimize Tensors, got {type(p).__name__}")
        if p.is_complex():
            raise TypeError(f"{who} does not support complex parameters "
                            f"(dtype {p.dtype}); view them as real with torch.view_as_real")
        if not p.is_floating_point():
            raise TypeError(f"{who} can only optimize floating point parameters, "
                            f"got dtype {p.dtype}")
        if p.is_sparse or p.layout != torch.strided:
            raise TypeError(f"{who} needs dense parameters, got layout {p.layout}")
        devices.add(p.device)
    if len(devices) > 1:
        raise ValueError("all parameters of one group must be on one device, got "
                         f"{sorted(str(d) for d in devices)}; put them in separate groups")
    if len(set(map(id, params))) != len(params):
        raise ValueError("a parameter group contains the same parameter twice")
    if "weight_decay" in group:
        group["weight_decay"] = normalize_weight_decay(group["weight_decay"])
    return group
