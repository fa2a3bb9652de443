"""elra: the ELRA/P2M optimizer for PyTorch (exponential learning rate adaption).

``ElraOptimizer`` tunes its own step size from the angle between consecutive gradients,
retraces failed steps, grows its batch by gradient collection and controls its weight decay.
``ElraAdam`` asks ELRA's question of a long-horizon drift of Adam's steps: Adam's direction with
one self-tuned step size, for the models Adam trains well (transformers, small CNNs).
``ElraGradScaler`` is its loss scaler for mixed precision. See ``get_user_manual_path()``.
"""

import logging
from pathlib import Path

from ._ops import native_status
from ._version import __version__
from .adam import ElraAdam
from .optimizer import ElraOptimizer
from .scaler import ElraGradScaler

logging.getLogger("elra").addHandler(logging.NullHandler())

__all__ = ["ElraOptimizer", "ElraAdam", "ElraGradScaler", "get_user_manual_path", "native_status",
           "__version__"]


def get_user_manual_path() -> str:
    """The path of the user manual (Markdown) shipped inside the installed package."""
    return str(Path(__file__).resolve().parent / "docs" / "user_manual.md")
