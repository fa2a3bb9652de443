"""ELRA under the Hugging Face Trainer (elra.hf_trainer.ElraTrainer), offline.

The Trainer calls a bare optimizer.step() through accelerate; ElraTrainer hands it the loss of
each (accumulated) step. Two runs: a tiny randomly initialised GPT-2 on the bytes of the user
manual, with gradient accumulation, against a hand-written loop over the same micro-batches (same
losses and parameters to float tolerance), and the digits anchor task through the Trainer, which
reproduces the hand-written anchor loop bit for bit and so its quality.
"""

import math
import warnings
from pathlib import Path

import pytest
import torch

from elra import ElraAdam, ElraOptimizer, get_user_manual_path
from conftest import DIGITS_SEEDS, digits_anchor_optimizer, digits_split, mlp, one_thread, require

pytestmark = pytest.mark.slow  # trainings

transformers = require("transformers")
from elra.hf_trainer import ElraTrainer, elra_optimizer  # noqa: E402

BAR = 0.965  # the hand-written digits loop's bar (test_convergence)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # small models; compared with runs made on one thread
        yield


class InOrder(ElraTrainer):
    """The Trainer's data loader, without shuffling (so a hand loop can see the same batches)."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def args(tmp_path, **kw):
    kw.setdefault("seed", 0)
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
        max_grad_norm=0.0, **kw)


# --- a tiny GPT-2 ----------------------------------------------------------------------------------
def text_chunks(n, length=33):
    data = torch.tensor(list(Path(get_user_manual_path()).read_bytes()[:n * length]))
    return [data[i * length:(i + 1) * length] for i in range(n)]


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


class Chunks(torch.utils.data.Dataset):
    def __init__(self, chunks):
        self.chunks = chunks

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


OPTIMIZERS = {"ElraOptimizer": lambda params: ElraOptimizer(params, regime="stochastic", lr=1e-4,
                                                           warmup=10),
              "ElraAdam": ElraAdam}


@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_gpt2_trainer_run_is_the_hand_written_loop(tmp_path, which):
    chunks, batch, accum = text_chunks(8 * 2 * 30), 8, 2  # 30 optimizer steps
    model = gpt2()
    opt = OPTIMIZERS[which](model.parameters())
    trainer = InOrder(model=model, args=args(tmp_path, per_device_train_batch_size=batch,
                                              gradient_accumulation_steps=accum,
                                              num_train_epochs=1),
                      train_dataset=Chunks(chunks), optimizers=(opt, None))
    losses, seen = [], []
    record = opt.set_loss  # what the Trainer hands to ELRA, one share per micro-batch
    opt.set_loss = lambda loss: (seen.append(float(loss.detach())), record(loss))[1]
    trainer.add_callback(type("Seen", (transformers.TrainerCallback,), {
        "on_optimizer_step": lambda self, a, s, c, **kw: losses.append(
            elra_optimizer(kw["optimizer"]).stats["steps"])}))
    with pytest.warns(UserWarning, match="scheduler"):  # the Trainer's, ignored by ELRA
        trainer.train()
    assert losses == list(range(1, 31))  # ELRA took a (loss-driven) step at every optimizer step

    hand = gpt2()
    hand_opt = OPTIMIZERS[which](hand.parameters())
    micro = [{"input_ids": torch.stack(chunks[i:i + batch]),
              "labels": torch.stack(chunks[i:i + batch])} for i in range(0, len(chunks), batch)]
    hand_losses = []
    for k in range(0, len(micro), accum):
        hand_opt.zero_grad()
        group = micro[k:k + accum]
        _, n_items = trainer.get_batch_samples(iter(group), accum, torch.device("cpu"))
        shares = []
        for m in group:  # the Trainer's normalisation: by the tokens of the whole step
            loss = hand(**m, num_items_in_batch=n_items).loss
            loss.backward()
            shares.append(loss.item())
        hand_opt.step(sum(shares))
        hand_losses.append(sum(shares))
    for a, b in zip(model.parameters(), hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert hand_opt.stats["steps"] == opt.stats["steps"] == 30
    trainer_losses = [sum(seen[k:k + accum]) / accum for k in range(0, len(seen), accum)]
    assert trainer_losses == pytest.approx(hand_losses, rel=1e-5)  # the loss ELRA saw, per step
    print(f"[measured] GPT-2 Trainer vs hand loop: max relative loss difference "
          f"{max(abs(a / b - 1) for a, b in zip(trainer_losses, hand_losses)):.2e} over 30 steps, "
          f"loss {hand_losses[0]:.3f} -> {hand_losses[-1]:.3f}")
    assert hand_losses[-1] < 0.8 * hand_losses[0]  # it learns
    assert opt.stats["retraces"] == hand_opt.stats["retraces"]


# --- the digits anchor through the Trainer ------------------------------------------------------
class DigitsModel(torch.nn.Module):
    """The anchor's MLP as a Trainer model: returns the loss when given labels."""

    def __init__(self, seed):
        super().__init__()
        self.net = mlp(seed)

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


class AnchorBatches(torch.utils.data.Dataset):
    """The hand-written loop's 880 mini-batches, in its order, one per item."""

    def __init__(self, X, y, seed, epochs=20, batch=32):
        Xtr, ytr, _, _, g = digits_split(X, y, seed)
        self.items = []
        for _ in range(epochs):
            p = torch.randperm(1400, generator=g)
            for i in range(0, 1400, batch):
                idx = p[i:i + batch]
                self.items.append({"x": Xtr[idx], "labels": ytr[idx]})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_digits_through_the_trainer_is_the_anchor_loop(tmp_path, digits, digits_anchor):
    X, y = digits
    accs = []
    for seed, (_, hand_acc, hand_model, hand_opt) in zip(DIGITS_SEEDS, digits_anchor):
        model = DigitsModel(seed)
        opt = digits_anchor_optimizer(model.net)
        trainer = InOrder(model=model, args=args(tmp_path, per_device_train_batch_size=1,
                                                  num_train_epochs=1, seed=seed),
                          train_dataset=AnchorBatches(X, y, seed),
                          data_collator=lambda items: items[0], optimizers=(opt, None))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the scheduler's (ignored) learning rates
            trainer.train()
        assert all(torch.equal(a, b) for a, b in zip(model.net.parameters(),
                                                     hand_model.parameters())), f"seed {seed}"
        assert opt.stats["steps"] == hand_opt.stats["steps"] == 880
        _, _, Xte, yte, _ = digits_split(X, y, seed)
        with torch.no_grad():
            acc = (model.net(Xte).argmax(1) == yte).float().mean().item()
        assert acc == hand_acc
        print(f"[measured] trainer digits seed {seed}: accuracy {acc:.4f} (hand loop {hand_acc:.4f})")
        accs.append(acc)
    assert sum(accs) / len(accs) >= BAR, accs


def test_elra_trainer_builds_its_optimizer_and_evaluates_the_boosted_average(tmp_path):
    """Without an optimizer given, ElraTrainer builds ELRA over the Trainer's usual groups; the
    Trainer's evaluate() calls optimizer.eval(): with boosting on, the average is evaluated in
    place, and optimizer.train() (which the Trainer calls at its next training step) puts the
    training point back."""
    chunks = text_chunks(8 * 20)
    model = gpt2()
    trainer = InOrder(model=model, args=args(tmp_path, per_device_train_batch_size=8,
                                              num_train_epochs=1, weight_decay=1e-4),
                      train_dataset=Chunks(chunks), eval_dataset=Chunks(chunks[:16]))
    trainer.create_optimizer()
    opt = elra_optimizer(trainer.optimizer)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    opt.get_boost_model(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Trainer's scheduler, ignored by ELRA
        trainer.train()
    training_point = [p.detach().clone() for p in model.parameters()]
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    average = {i: sd["state"][i]["boost_average"] for i in index.values()}
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    for p in model.parameters():  # evaluated at the average, in place
        torch.testing.assert_close(p.detach(), average[index[id(p)]].to(p.dtype))
    assert not all(torch.equal(a, b) for a, b in zip(training_point, model.parameters()))
    opt.train()
    assert all(torch.equal(a, b) for a, b in zip(training_point, model.parameters()))
