"""ElraAdam under DDP on two gloo ranks (tests/adam_dist_worker.py): the ranks stay bitwise
equal when only one of them sees a NaN loss, a loss spike or a NaN input, because the guard
decides from the loss averaged over the process group; and the run follows the
single-process run on the same global batches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adam_dist_worker as W
from conftest import one_thread

pytestmark = pytest.mark.slow  # subprocess runs

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
WORKER_TIMEOUT = 180  # seconds (a few on an idle machine)
TOLERANCE = 1e-5  # DDP's averaged gradient vs the whole batch's: float32 rounding


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("adam_dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    procs = [subprocess.Popen([sys.executable, str(Path(W.__file__)), str(r), str(WORLD),
                               str(out / "init"), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(WORLD)]
    try:
        logs = [p.communicate(timeout=WORKER_TIMEOUT)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the distributed workers did not finish within {WORKER_TIMEOUT} s")
    if any(p.returncode for p in procs):
        errors = "\n".join(f.read_text() for f in sorted(out.glob("*.err")))
        pytest.fail(f"a worker failed:\n{errors or logs[-1][-3000:]}")
    return [torch.load(out / f"adam_ddp.rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ddp_ranks_stay_bitwise_equal_when_one_rank_sees_bad_values(ranks):
    r0, r1 = ranks
    assert r0["outcomes"] == r1["outcomes"]
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert [r0["outcomes"][i] for i in sorted(W.EVENTS)] == ["retrace_loss"] * 3
    assert r0["outcomes"].count("accepted") == W.STEPS - 3


def test_ddp_follows_the_single_process_run(ranks):
    with one_thread():
        params, outcomes = W.single()
    assert outcomes == ranks[0]["outcomes"]
    dev = max((params[k] - ranks[0]["params"][k]).abs().max().item() for k in params)
    assert dev < TOLERANCE, dev
