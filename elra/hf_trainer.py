"""``ElraTrainer``: the Hugging Face ``transformers.Trainer``, training with ELRA.

The Trainer calls a bare ``optimizer.step()`` (through accelerate), so on its own it would give
ELRA no loss. :class:`ElraTrainer` hands the loss over: after each micro-batch's backward pass it
records the loss with :meth:`ElraOptimizer.set_loss`, so the step uses the loss of the whole
accumulated batch (``training_step`` returns each micro-batch's share of it, divided by the
accumulation steps or normalised by the batch's token count; the step's loss is their sum, so
each share is recorded times the number of micro-batches and ``set_loss`` takes the mean).
Everything else is the Trainer's: its scheduler is built and ignored by ELRA (one warning), and
``optimizer.train()`` / ``optimizer.eval()`` are called by the Trainer around evaluation, which
evaluates the boosted average when boosting is on (``get_boost_model(True)``).

Importing this module imports ``transformers``; ``import elra`` does not.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import transformers

from .adam import ElraAdam
from .optimizer import ElraOptimizer


def elra_optimizer(optimizer: Any) -> Union[ElraOptimizer, ElraAdam]:
    """The ``ElraOptimizer`` (or ``ElraAdam``) inside ``optimizer`` (accelerate and others wrap
    it in objects with an ``optimizer`` attribute); ``TypeError`` if there is none."""
    seen = optimizer
    for _ in range(8):
        if isinstance(seen, (ElraOptimizer, ElraAdam)):
            return seen
        seen = getattr(seen, "optimizer", None)
    raise TypeError(f"ElraTrainer needs an ElraOptimizer or ElraAdam, got "
                    f"{type(optimizer).__name__}")


class ElraTrainer(transformers.Trainer):
    """``transformers.Trainer`` that passes each step's loss to ELRA.

    Use it as the Trainer. With ``optimizers=(None, None)`` (the default) it builds
    ``ElraOptimizer(..., regime="stochastic", lr=1e-4, warmup=10)`` over the Trainer's usual
    parameter groups (``args.weight_decay`` for all but biases and norms); pass
    ``optimizers=(ElraOptimizer(...), None)`` for your own settings. ``TrainingArguments``'
    ``learning_rate`` and scheduler have no effect (ELRA sets its own step). Gradient clipping
    (``max_grad_norm``, 1.0 by default) rescales the gradients before ELRA sees them; ELRA bounds
    its own step (``|lr g| <= 10``), so ``max_grad_norm=0`` is the setting that leaves the
    algorithm as it is.
    """

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay],
                       "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            self.optimizer = ElraOptimizer([g for g in groups if g["params"]], regime="stochastic",
                                           lr=1e-4, warmup=10)
        return self.optimizer

    def training_step(self, model: torch.nn.Module, inputs: dict,
                      num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        elra_optimizer(self.optimizer).set_loss(loss * self.current_gradient_accumulation_steps)
        return loss
