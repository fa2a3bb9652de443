"""The code in the user manual and the README runs as printed."""

import contextlib
import io
import re
from pathlib import Path

import torch

from elra import get_user_manual_path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", Path(path).read_text(), re.S)


def run_blocks(blocks, namespace, where):
    for i, block in enumerate(blocks):
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block, f"{where}, python block {i}", "exec"), namespace)
    return namespace


def test_manual_examples_run_in_order():
    """The manual's blocks build on each other (model, X, Y, loss_fn of the quick start)."""
    blocks = python_blocks(get_user_manual_path())
    assert len(blocks) >= 10
    ns = run_blocks(blocks, {}, "user manual")
    assert isinstance(ns["optimizer"], torch.optim.Optimizer)


def test_readme_usage_runs():
    blocks = python_blocks(ROOT / "README.md")
    assert blocks
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 64), torch.randint(0, 10, (256,)))
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    ns = run_blocks(blocks, {"loader": loader}, "README")
    assert ns["optimizer"].last_outcome == "accepted"
