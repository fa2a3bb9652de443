"""ELRA under PyTorch Lightning and Hugging Face accelerate, on the digits anchor.

The runs reuse the hand-written loop's setup (conftest.train_digits: the 1400/397 split, the
64-128-10 MLP, batch 32, 20 epochs, the stochastic regime with lr=1e-4, warmup=10, seeds 0-2):
the data loaders draw each epoch's batch order from the same generator, so a framework run sees
exactly the batches of the hand-written run. In float32 both frameworks then reproduce the
hand-written run bit for bit (Lightning through its closure, accelerate through set_loss and
a bare step()); with bf16-mixed, Lightning reaches the same accuracy bar (>= 0.965 on average).
"""

import pytest
import torch

from elra import ElraOptimizer
from conftest import (DIGITS_SEEDS, control_of, digits_anchor_optimizer, digits_split, mlp,
                      one_thread, require)

BAR = 0.965  # the hand-written loop's bar (test_convergence.test_digits_stochastic_anchor)
pytestmark = [pytest.mark.slow,  # trainings
              pytest.mark.filterwarnings(  # Lightning's own, about torch.utils._pytree
                  "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # as the hand-written runs of the digits_anchor fixture
        yield


class EpochOrder(torch.utils.data.Sampler):
    """Each epoch a permutation drawn from ``generator``, as train_digits draws it."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self):
        return self.n


def digits_loader(X, y, seed):
    Xtr, ytr, Xte, yte, g = digits_split(X, y, seed)
    data = torch.utils.data.TensorDataset(Xtr, ytr)
    loader = torch.utils.data.DataLoader(data, batch_size=32, sampler=EpochOrder(len(Xtr), g))
    return loader, (Xtr, ytr, Xte, yte)


@torch.no_grad()
def evaluate(model, split):
    Xtr, ytr, Xte, yte = split
    loss = torch.nn.functional.cross_entropy(model(Xtr), ytr).item()
    acc = (model(Xte).argmax(1) == yte).float().mean().item()
    return loss, acc


def same_params(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --- Lightning -------------------------------------------------------------------------------------
def lightning_run(X, y, seed, precision, callbacks=(), logger=False, set_loss=False):
    """``set_loss``: training_step hands the loss to ELRA (the manual's recipe for 16-mixed,
    where torch's GradScaler calls a bare optimizer.step())."""
    pl = require("lightning.pytorch")

    class DigitsModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(seed)

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            loss = torch.nn.functional.cross_entropy(self.net(xb).float(), yb)
            if set_loss:
                self.optimizers().optimizer.set_loss(loss.detach())
            return loss

        def configure_optimizers(self):
            return digits_anchor_optimizer(self.net)

    loader, split = digits_loader(X, y, seed)
    module = DigitsModule()
    kw = {"precision": precision}
    if precision == "16-mixed":  # on the CPU Lightning turns the string into bf16-mixed; the
        from lightning.pytorch.plugins import MixedPrecision  # plugin keeps fp16 and its scaler

        # a scale far too high at first: the early steps overflow and are skipped
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
        kw = {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=scaler)]}
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=20, logger=logger,
                         callbacks=list(callbacks), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **kw)
    trainer.fit(module, train_dataloaders=loader)
    return module.net, evaluate(module.net, split), trainer


def lr_monitor_parts():
    """A LearningRateMonitor, an in-memory logger it logs to, and a callback that records
    ELRA's current step (param_groups[0]["lr"]) at the same moments."""
    pl = require("lightning.pytorch")
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import Logger

    class MemoryLogger(Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        name = "memory"
        version = 0

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    class StepSeen(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, *args):
            self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    return LearningRateMonitor(logging_interval="step"), MemoryLogger(), StepSeen()


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_lightning_float32_is_the_hand_written_loop(digits, digits_anchor):
    """Automatic optimization passes a closure; the run equals the hand-written one exactly,
    and the LR monitor logs ELRA's current step."""
    X, y = digits
    monitor, memory, seen = lr_monitor_parts()
    accs = []
    for seed, (_, hand_acc, hand_model, hand_opt) in zip(DIGITS_SEEDS, digits_anchor):
        extra = dict(callbacks=(monitor, seen), logger=memory) if seed == 0 else {}
        net, (loss, acc), trainer = lightning_run(X, y, seed, "32-true", **extra)
        assert same_params(net, hand_model), f"seed {seed}"
        assert acc == hand_acc
        opt = trainer.optimizers[0]
        assert isinstance(opt, ElraOptimizer) and opt.stats["steps"] == 880
        accs.append(acc)
    assert sum(accs) / len(accs) >= BAR, accs
    logged = [m["lr-ElraOptimizer"] for _, m in memory.rows if "lr-ElraOptimizer" in m]
    assert len(logged) == 880 and logged == seen.seen
    assert logged[0] == 1e-4  # the user's lr is the first step's length
    # then ELRA's own step: the warm-up ramp, then the schedule's sawtooth
    assert logged[2:6] == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert len(set(logged)) > 10 and all(0.05 < v < 1.0 for v in logged[2:])


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_lightning_bf16_mixed_reaches_the_bar(digits):
    X, y = digits
    accs = [lightning_run(X, y, seed, "bf16-mixed")[1][1] for seed in DIGITS_SEEDS]
    assert sum(accs) / len(accs) >= BAR, accs


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_lightning_16_mixed_with_torch_grad_scaler(digits, digits_anchor):
    """precision="16-mixed": Lightning's torch.amp.GradScaler skips steps whose scaled gradients
    overflow (ELRA never sees them) and calls a bare step() otherwise; with the loss handed over
    in training_step the run trains like the float32 one."""
    X, y = digits
    for seed, (_, hand_acc, _, _) in zip(DIGITS_SEEDS, digits_anchor):
        net, (loss, acc), trainer = lightning_run(X, y, seed, "16-mixed", set_loss=True)
        opt = trainer.optimizers[0]
        scaler = trainer.precision_plugin.scaler
        assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() < 2.0 ** 30
        assert 840 < opt.stats["steps"] < 880  # the steps that overflowed were skipped
        assert all(torch.isfinite(p).all() for p in net.parameters())
        assert opt.stats["no_loss_steps"] == 0  # every step had its loss
        assert abs(acc - hand_acc) <= 0.01, (acc, hand_acc)
        print(f"[measured] lightning 16-mixed seed {seed}: accuracy {acc:.4f} (float32 {hand_acc:.4f}), "
              f"{opt.stats['steps']} of 880 steps taken")


# --- accelerate ------------------------------------------------------------------------------------
@pytest.fixture
def accelerator_factory():
    require("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def make(**kw):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return Accelerator(cpu=True, **kw)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accelerate_loop_is_the_hand_written_loop(digits, digits_anchor, accelerator_factory):
    """A bare optimizer.step() after opt.set_loss(loss), as in an accelerate training loop."""
    X, y = digits
    accs = []
    for seed, (_, hand_acc, hand_model, _) in zip(DIGITS_SEEDS, digits_anchor):
        accelerator = accelerator_factory()
        loader, split = digits_loader(X, y, seed)
        model = mlp(seed)
        opt = digits_anchor_optimizer(model)
        model, optimizer, loader = accelerator.prepare(model, opt, loader)
        for _ in range(20):
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                accelerator.backward(loss)
                opt.set_loss(loss)  # the ElraOptimizer itself: accelerate's wrapper
                optimizer.step()  # does not forward set_loss
        assert same_params(model, hand_model), f"seed {seed}"
        accs.append(evaluate(model, split)[1])
        assert accs[-1] == hand_acc
    assert sum(accs) / len(accs) >= BAR, accs


def _micro_batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(64, 10, generator=g)
    out = []
    for _ in range(n):
        x = torch.rand(32, 64, generator=g)
        out.append((x, (x @ teacher).argmax(1)))
    return out


@pytest.mark.parametrize("collects", [1, 2])
def test_accelerate_accumulation_and_elra_collection_multiply(collects, accelerator_factory):
    """accelerate's gradient accumulation (k micro-batches per optimizer call) and ELRA's own
    collection (``collects`` calls per step) multiply: a step every k * collects micro-batches,
    on the mean gradient and the mean loss of the micro-batches in between."""
    k = 2
    micro = _micro_batches(48)
    lf = torch.nn.functional.cross_entropy
    make = dict(lr=1e-4, warmup=10, regime="stochastic", classes=10, collects=collects)

    # accelerate: set_loss on every micro-batch, step() and zero_grad() on every one (accelerate
    # skips them until the gradients are complete)
    accelerator = accelerator_factory(gradient_accumulation_steps=k)
    model = mlp(0)
    opt = ElraOptimizer(model.parameters(), **make)
    model, optimizer = accelerator.prepare(model, opt)
    moved_at, outcomes = [], []
    for i, (xb, yb) in enumerate(micro):
        before = [p.detach().clone() for p in model.parameters()]
        with accelerator.accumulate(model):
            loss = lf(model(xb), yb)
            accelerator.backward(loss)
            opt.set_loss(loss)
            optimizer.step()
            optimizer.zero_grad()
        if not all(torch.equal(a, p) for a, p in zip(before, model.parameters())):
            moved_at.append(i)
        outcomes.append(opt.last_outcome)
    assert moved_at == list(range(k * collects - 1, len(micro), k * collects))

    # by hand: accumulate k micro-batches (loss / k each), one call with their mean loss
    hand = mlp(0)
    hand_opt = ElraOptimizer(hand.parameters(), **make)
    for j in range(0, len(micro), k):
        hand_opt.zero_grad()
        losses = []
        for xb, yb in micro[j:j + k]:
            loss = lf(hand(xb), yb)
            (loss / k).backward()
            losses.append(loss.item())
        hand_opt.step(sum(losses) / k)
    assert same_params(model, hand)
    assert control_of(opt) == control_of(hand_opt)
    if collects > 1:  # what ELRA did at accelerate's optimizer calls (every k-th micro-batch)
        assert outcomes[k - 1::k][:4] == ["collected", "first", "collected", "accepted"]
