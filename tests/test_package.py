"""The package as users get it: metadata in one place, an sdist and a wheel that install into a
fresh virtual environment and train, with the native kernels and without (ELRA_NATIVE=0)."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import elra

ROOT = Path(__file__).resolve().parents[1]
TRAIN = """
import torch, elra
from elra import ElraOptimizer
model = torch.nn.Linear(8, 2)
opt = ElraOptimizer(model.parameters(), regime="stochastic", lr=1e-3)
x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
first = None
for _ in range(30):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step(loss)
    first = first if first is not None else loss.item()
print(elra.__file__, elra.__version__, opt.engine_name, elra.native_status()["built"],
      loss.item() < first, opt.last_outcome)
"""


def test_metadata_is_in_one_place():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "elra" and meta["license"] == "GPL-3.0-or-later"
    assert meta["dynamic"] == ["version"] and "version" not in meta
    assert {"test", "dist"} <= set(meta["optional-dependencies"])
    assert "version=" not in (ROOT / "setup.py").read_text()  # written in elra/_version.py only
    assert (ROOT / "elra" / "py.typed").exists()


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    py = path / "bin" / "python"
    _pip(py, f"torch=={torch.__version__.split('+')[0]}")  # the pinned torch of this venv
    return py


def _pip(py: Path, *args: str) -> None:
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                   check=True, timeout=1200, capture_output=True)


def _install(py: Path, wheel: Path) -> None:
    """The wheel in place of any elra there, then its declared dependencies (numpy)."""
    _pip(py, "--force-reinstall", "--no-deps", str(wheel))
    _pip(py, str(wheel))


def _build(out: Path, native: bool) -> Path:
    env = dict(os.environ, ELRA_NATIVE="auto" if native else "0", MAX_JOBS="2")
    res = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                          str(ROOT)], env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1 and len(list(out.glob("*.tar.gz"))) == 1
    return wheels[0]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains(tmp_path):
    """python -m build --no-isolation makes an sdist and (from it) a wheel; the wheel installs
    into a new venv with the pinned torch and trains there, on the native kernels; a wheel
    built with ELRA_NATIVE=0 (no compiler needed) gives a working pure-torch package."""
    py = _venv(tmp_path / "venv")
    for native in (True, False):
        wheel = _build(tmp_path / f"dist-{native}", native)
        assert ("linux" in wheel.name) == native  # the pure-torch wheel is py3-none-any
        _install(py, wheel)
        res = subprocess.run([str(py), "-c", TRAIN], capture_output=True, text=True, timeout=600,
                             cwd=tmp_path, env={k: v for k, v in os.environ.items()
                                                if k != "PYTHONPATH"})
        assert res.returncode == 0, res.stderr[-3000:]
        where, version, engine, built, learned, outcome = res.stdout.split()
        assert where.startswith(str(tmp_path / "venv")) and version == elra.__version__
        assert (engine, built) == (("native", "True") if native else ("torch", "False"))
        assert learned == "True" and outcome == "accepted"
