"""torch.optim's step hooks and profiler label for ``ElraOptimizer.step``, only when in use.

``torch.optim.Optimizer`` wraps every subclass's ``step`` in a function that opens a profiler
range (``record_function``) and runs the registered step pre/post hooks. The range costs about
40 microseconds a call even when no profiler runs (measured here on 2 CPU cores, torch 2.13): as
much as a whole ELRA step of 100k parameters, so it decided that benchmark. :func:`hooked` wraps
``step`` instead in a function that checks first whether a profiler runs or any step hook is
registered (globally or on the optimizer), and only then goes through torch's own wrapper, so
that hooks, their argument replacement and the profiler's ``Optimizer.step#...`` range behave
exactly as for any torch optimizer. It marks the function ``hooked`` so that torch does not wrap
it a second time.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.optim import optimizer as _torch_optimizer


def hooked(step: Callable) -> Callable:
    """``step`` with torch.optim's hooks and profiler range whenever they are in use."""
    with_hooks = torch.optim.Optimizer.profile_hook_step(step)
    profiler_on = torch.autograd._profiler_enabled
    global_pre = _torch_optimizer._global_optimizer_pre_hooks
    global_post = _torch_optimizer._global_optimizer_post_hooks

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or global_pre
                or global_post or profiler_on()):
            return with_hooks(self, *args, **kwargs)
        return step(self, *args, **kwargs)

    wrapper.hooked = True
    return wrapper
