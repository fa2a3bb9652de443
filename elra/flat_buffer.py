"""One contiguous buffer per (device, dtype) for the trainable parameters and their gradients.

ELRA works on "all parameters as one vector": dot products, norms and one axpy-like update per
step. Keeping the parameters (and their gradients) as views into one flat buffer lets every one of
those be a single vector operation, with no concatenation or copy of all gradients per step.

[note: how the views stay valid]
Each trainable parameter's ``.data`` is re-pointed to a view of the buffer and its ``.grad`` to a
view of the gradient buffer; backward then accumulates into the buffer in place. Three things can
break that, and :meth:`FlatBuffer.sync_grads` and the optimizer's layout check notice each of
them at the start of a step: a gradient set to ``None`` (``model.zero_grad()``), a gradient
replaced by another tensor, and a parameter whose data was replaced (``model.to(...)``,
``p.data = ...``). The first two are repaired by zeroing or copying one parameter's segment;
the last makes the optimizer rebuild its layout and carry its state over.

[note: mirrored parameters (DTensor)]
A ``DTensor`` parameter (FSDP2) cannot be re-pointed: FSDP keeps its own (padded) storage of the
local shard and all-gathers from it, and gives each step a new ``DTensor`` gradient. Such
parameters are *mirrored*: the buffer holds a copy of their local shards, :meth:`FlatBuffer.pull`
copies the shards in at the start of a call, :meth:`FlatBuffer.sync_grads` copies the local
gradients in, and :meth:`FlatBuffer.push` writes the new values back after the step (three extra
passes over the local shard, which is 1/world of the model). Empty shards are fine.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from itertools import compress
from typing import Callable

import torch

from .distributed import local_tensor

logger = logging.getLogger("elra")
_GRAD = operator.attrgetter("grad")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_DATA_PTR = torch._C.TensorBase.data_ptr  # the C method itself: half the cost of a lookup


def _LOCAL_PTR(p: torch.Tensor) -> int:
    return local_tensor(p).data_ptr()


@dataclass(frozen=True)
class Segment:
    """The elements ``[start, end)`` of a buffer that belong to one parameter group."""

    group: int
    start: int
    end: int


class FlatBuffer:
    """Parameters of one device and dtype as views into one contiguous tensor.

    ``params`` must be ordered by parameter group, so that each group is a contiguous
    :class:`Segment`. The constructor moves the parameter values (and existing gradients) into
    the buffers; parameters keep their identity, only their storage changes. With
    ``mirror=True`` (DTensor parameters) the buffer holds a copy of the local shards instead (see
    the note above).
    """

    def __init__(self, params: list[torch.nn.Parameter], groups: list[int], mirror: bool = False):
        if not params:
            raise ValueError("a FlatBuffer needs at least one parameter")
        self.params = list(params)
        self.mirror = bool(mirror)
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.locals = [local_tensor(p) for p in params] if mirror else None
        self.shapes = [t.shape for t in self.locals] if mirror else [p.shape for p in params]
        sizes = [s.numel() for s in self.shapes]
        self.offsets = []
        total = 0
        for s in sizes:
            self.offsets.append(total)
            total += s
        self.numel = total
        self.sizes = sizes
        segments: list[Segment] = []
        for grp, off, size in zip(groups, self.offsets, sizes):
            if segments and segments[-1].group == grp and segments[-1].end == off:
                segments[-1] = Segment(grp, segments[-1].start, off + size)
            else:
                segments.append(Segment(grp, off, off + size))
        self.segments = segments
        self.data = torch.empty(total, dtype=self.dtype, device=self.device)
        self.grad = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.data_views = self.views(self.data)
        self.grad_views = self.views(self.grad)
        if mirror:
            self.pull()
            self.sync_grads()
            return
        for p, dv, gv in zip(self.params, self.data_views, self.grad_views):
            dv.copy_(p.detach())
            if p.grad is not None:
                _check_grad(p, p.grad)
                gv.copy_(p.grad)
            p.data = dv
            p.grad = gv

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views (parameter shapes) of a tensor laid out like this buffer."""
        return [flat[o:o + n].view(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]

    def new_zeros(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.zeros(self.numel, dtype=dtype or self.dtype, device=self.device)

    def pull(self) -> None:
        """Mirrored buffer: copy the parameters' local shards in."""
        if self.mirror:
            for t, dv in zip(self.locals, self.data_views):
                dv.copy_(t)

    def push(self) -> None:
        """Mirrored buffer: write the buffer back into the parameters' local shards."""
        if self.mirror:
            for t, dv in zip(self.locals, self.data_views):
                t.copy_(dv)

    def sync_grads(self) -> int:
        """Make every ``p.grad`` a view of the gradient buffer again; return how many had one.

        A gradient set to ``None`` counts as zero; a gradient replaced by another tensor is
        copied into the buffer (one parameter's worth), and the parameter's ``.grad`` is
        pointed back at the buffer. A mirrored buffer copies every local gradient in.
        """
        if self.mirror:
            present = 0
            for p, gv in zip(self.params, self.grad_views):
                g = p.grad
                if g is None:
                    gv.zero_()
                    continue
                gl = local_tensor(g)
                if gl.shape != gv.shape:
                    raise RuntimeError(f"the local gradient of shape {tuple(gl.shape)} does not "
                                       f"match its parameter's local shard {tuple(gv.shape)}")
                gv.copy_(gl)
                present += 1
            return present
        if not any(map(operator.is_not, map(_GRAD, self.params), self.grad_views)):
            return len(self.params)  # the common case, checked in C-level loops
        present = 0
        for p, gv in zip(self.params, self.grad_views):
            g = p.grad
            if g is gv:
                present += 1
                continue
            if g is None:
                gv.zero_()
            else:
                _check_grad(p, g)
                gv.copy_(g)
                present += 1
                if not getattr(self, "_copy_logged", False):
                    self._copy_logged = True
                    logger.info("elra: a gradient was replaced outside the optimizer; copying it "
                                "into the flat buffer (optimizer.zero_grad() avoids the copy)")
            p.grad = gv
        return present

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffer in place and re-attach the views (a mirrored buffer: the
        parameters' own gradients are set to ``None`` or zeroed, as ``set_to_none`` says)."""
        self.grad.zero_()
        if self.mirror:
            for p in self.params:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()
            return
        for p, gv in zip(self.params, self.grad_views):
            if p.grad is not gv:
                p.grad = gv


def _check_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(
            "ElraOptimizer does not support sparse gradients (layout "
            f"{g.layout}); use dense gradients, e.g. nn.Embedding(sparse=False)")
    if g.shape != p.shape:
        raise RuntimeError(f"gradient of shape {tuple(g.shape)} does not match its parameter's "
                           f"shape {tuple(p.shape)}")


class Layout:
    """The trainable parameters of an optimizer's groups as flat buffers (one per device and
    dtype, see :class:`FlatBuffer`), and the check that they still are.

    ``groups`` are the optimizer's parameter groups; the trainable parameters (``requires_grad``)
    are laid out, the others are left alone. ``mirror``: DTensor parameters (see the note above).
    Raises ``ValueError`` when no parameter is trainable.
    """

    def __init__(self, groups: list[dict], mirror: bool = False):
        trainable = [(gi, p) for gi, g in enumerate(groups) for p in g["params"] if p.requires_grad]
        if not trainable:
            raise ValueError("ElraOptimizer got no trainable parameters (all have "
                             "requires_grad=False)")
        by_key: dict[tuple, list] = {}
        for gi, p in trainable:
            by_key.setdefault((p.device, p.dtype), []).append((gi, p))
        self.buffers = [FlatBuffer([p for _, p in items], [gi for gi, _ in items], mirror=mirror)
                        for items in by_key.values()]
        self.mirror = bool(mirror)
        self.owned = {id(p) for b in self.buffers for p in b.params}
        # what changed() compares: the groups' parameters, which are trainable, where their data
        # lives (DTensor parameters: their local shard; their own data_ptr() is 0)
        self._ptr_of = _LOCAL_PTR if mirror else _DATA_PTR
        self._watch = [p for g in groups for p in g["params"]]
        self._trainable = list(map(_REQUIRES_GRAD, self._watch))
        self._ptrs = [self._ptr_of(p) for p in self._watch if p.requires_grad]

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buffers)

    def changed(self, groups: list[dict]) -> bool:
        """True if a parameter was added, removed, frozen or unfrozen, or its data replaced
        (``model.to(...)``, ``p.data = ...``) since the layout was built (C-level loops: this
        runs on every step)."""
        params = [p for g in groups for p in g["params"]]
        if len(params) != len(self._watch) or any(map(operator.is_not, params, self._watch)):
            return True
        trainable = list(map(_REQUIRES_GRAD, params))
        if trainable != self._trainable:
            return True
        return list(map(self._ptr_of, compress(params, trainable))) != self._ptrs

    def sync_grads(self) -> int:
        """Re-attach the gradient views (:meth:`FlatBuffer.sync_grads`); how many had one."""
        return sum(b.sync_grads() for b in self.buffers)

    def pull(self) -> None:
        if self.mirror:
            for b in self.buffers:
                b.pull()

    def push(self) -> None:
        if self.mirror:
            for b in self.buffers:
                b.push()

    def zero_grad(self, groups: list[dict], set_to_none: bool) -> None:
        """Zero the buffers' gradients in place (they stay attached); other parameters of the
        groups (frozen ones) follow ``set_to_none``."""
        for b in self.buffers:
            b.zero_grad(set_to_none)
        for g in groups:
            for p in g["params"]:
                if id(p) not in self.owned and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()

    def views(self, vectors: dict[str, list]) -> dict[str, dict]:
        """``{name: {parameter: view}}`` of flat vectors laid out like the buffers
        (``vectors``: one flat tensor or ``None`` per buffer, by name)."""
        out: dict[str, dict] = {}
        for name, flats in vectors.items():
            m = out.setdefault(name, {})
            for buf, flat in zip(self.buffers, flats):
                if flat is not None:
                    m.update(zip(buf.params, buf.views(flat)))
        return out


def copy_views(old: dict, new: dict) -> None:
    """Copy each ``old[name][parameter]`` view into ``new[name][parameter]`` where both exist
    (``{name: {parameter: view}}``, as :meth:`Layout.views` gives)."""
    for name, m in new.items():
        for p, v in m.items():
            if p in old.get(name, {}):
                v.copy_(old[name][p])


class StateViews:
    """Keeps ``optimizer.state[p][name]`` a view of the engine's flat vector ``name``.

    :meth:`publish` lays the views out anew (after a rebuild, a load, boosting turned on or off);
    :meth:`follow` is the per-call check that the views still point at the vectors the engine
    uses: the one-pass step alternates between two direction buffers (a swap costs one dict
    assignment per parameter, the views of both being looked up once), and a collection buffer
    appears when the batch grows.
    """

    def __init__(self, layout: Layout, state: dict):
        self.layout, self.state = layout, state
        self.first: tuple = ()

    def publish(self, vectors: dict[str, list]) -> None:
        self.state.clear()
        for name, m in self.layout.views(vectors).items():
            for p, v in m.items():
                self.state[p][name] = v
        p0 = self.layout.buffers[0].params[0]
        self.first = (p0, self.state[p0])  # to notice a state replaced from outside (ZeRO)
        self._direction = vectors["direction"]
        self._collected = "collected" in vectors
        self._pairs: dict[tuple, list] = {}

    def follow(self, vectors_of: Callable[[], dict], direction: list,
               collected: bool) -> None:
        if collected != self._collected:
            return self.publish(vectors_of())
        if direction is self._direction:
            return
        key = tuple(map(id, direction))
        pairs = self._pairs.get(key)
        if pairs is None:
            views = self.layout.views({"direction": direction})["direction"]
            pairs = self._pairs[key] = [(self.state[p], v) for p, v in views.items()]
        for entry, v in pairs:
            entry["direction"] = v
        self._direction = direction
