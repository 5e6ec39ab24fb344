"""The shared training loop on a tiny real task: topic of 400 BBC News articles from GloVe."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

import lorakit.lora as lora
from lorakit.config import ConfigError, TrainConfig
from lorakit.data import load_dataset
from lorakit.models.classic import TextClassifier, build_vocabulary, collate, encode_split
from lorakit.rundir import RunDir
from lorakit.train.loop import parameter_groups, train_loop
from lorakit.train.metrics import evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # a tiny model: one thread is faster


@pytest.fixture(scope="module")
def news():
    dsd = load_dataset("bbc-news")
    train = dsd["train"].shuffle(seed=0).select(range(400))
    validation = dsd["validation"].select(range(100))
    vocab, vectors = build_vocabulary(train["text"], "glove-6b-50d")
    encoded = {
        name: encode_split(split, vocab, 64).select_columns(["input_ids", "label"])
        for name, split in {"train": train, "validation": validation}.items()
    }
    return encoded, vectors


def make(news, batch_size=32):
    encoded, vectors = news
    torch.manual_seed(0)
    model = TextClassifier(vectors.shape[0], vectors.shape[1], 5)
    with torch.no_grad():
        model.embedding.weight.copy_(vectors)
    model.embedding.weight.requires_grad_(False)
    train = DataLoader(encoded["train"], batch_size=batch_size, shuffle=True, collate_fn=collate)
    val = DataLoader(encoded["validation"], batch_size=64, collate_fn=collate)
    return model, train, val


def test_loop_learns_and_logs(news, tmp_path):
    model, train, val = make(news)
    before = evaluate(model, val)
    run = RunDir(tmp_path / "run")
    config = TrainConfig(epochs=3, lr=1e-2, batch_size=32, log_every=5, warmup_ratio=0.1)
    result = train_loop(model, train, val, config, run_dir=run, seed=0, show_progress=False)
    after = evaluate(model, val)  # the model holds the best evaluation's weights
    assert after["accuracy"] > max(0.6, before["accuracy"] + 0.3)
    assert after["accuracy"] == result.best_metrics["accuracy"]
    assert after["loss"] == pytest.approx(result.best_metrics["loss"], rel=1e-6)
    assert result.steps == 3 * len(train)
    events = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert kinds == {"train", "eval", "epoch"}
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1.0, 2.0, 3.0]
    assert all({"train_loss", "val_loss", "val_accuracy", "time"} <= set(e) for e in epochs)
    # only trainable parameters moved; the frozen embedding did not
    assert torch.equal(model.embedding.weight, news[1])


def test_eval_every_max_steps_and_accumulation(news):
    model, train, val = make(news, batch_size=16)
    config = TrainConfig(epochs=5, max_steps=7, grad_accum_steps=2, eval_every=3, lr=1e-2)
    result = train_loop(model, train, val, config, seed=0, show_progress=False)
    assert result.steps == 7
    assert [e["step"] for e in result.history if e["event"] == "eval"] == [3, 6, 7]


def test_early_stopping(news):
    model, train, val = make(news)
    # a learning rate of almost nothing: no evaluation improves on the first
    config = TrainConfig(epochs=10, lr=1e-12, early_stopping_patience=2, max_grad_norm=0)
    result = train_loop(model, train, val, config, seed=0, show_progress=False)
    assert result.stopped_early and result.best_step == len(train)
    assert result.steps == 3 * len(train)


def test_patience_running_out_at_the_last_evaluation_is_no_early_stop(news):
    model, train, val = make(news)
    config = TrainConfig(epochs=3, lr=1e-12, early_stopping_patience=2, max_grad_norm=0)
    result = train_loop(model, train, val, config, seed=0, show_progress=False)
    assert result.steps == 3 * len(train)  # every planned step ran
    assert not result.stopped_early


def test_bf16_autocast_trains_and_is_removed_after(news):
    model, train, val = make(news)
    config = TrainConfig(epochs=1, lr=1e-2, bf16=True)
    result = train_loop(model, train, val, config, seed=0, show_progress=False)
    assert result.best_metrics["accuracy"] > 0.3
    out = model(**next(iter(val)))
    assert out.logits.dtype == torch.float32 and not hasattr(model, "_original_forward")


def test_model_without_trainable_parameters_is_refused(news):
    model, train, val = make(news)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_loop(model, train, val, TrainConfig(epochs=1), show_progress=False)


def test_lora_plus_puts_the_b_matrices_in_their_own_group(news):
    model, _, _ = make(news)
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"]))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    (one,) = parameter_groups(model, 1e-3)
    assert one["lr"] == 1e-3 and {id(p) for p in one["params"]} == trainable
    rest, b = parameter_groups(model, 1e-3, 16)
    assert rest["lr"] == 1e-3 and b["lr"] == pytest.approx(1.6e-2)
    assert [id(p) for p in b["params"]] == [id(model.fc1.lora_B["default"].weight)]
    assert {id(p) for p in rest["params"] + b["params"]} == trainable


def test_lora_plus_trains_b_at_its_own_lr(news):
    model, train, val = make(news)
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"]))
    A, B = model.fc1.lora_A["default"].weight, model.fc1.lora_B["default"].weight
    a_before, b_before = A.detach().clone(), B.detach().clone()
    # A at a vanishing lr, B at 1e-2: only B may move
    config = TrainConfig(epochs=1, max_steps=5, lr=1e-10, lora_plus_ratio=1e8)
    train_loop(model, train, val, config, seed=0, show_progress=False)
    assert (A - a_before).abs().max() < 1e-6
    assert (B - b_before).abs().max() > 1e-3


def test_lora_plus_without_lora_is_refused(news):
    model, _, _ = make(news)
    with pytest.raises(ConfigError, match="lora_plus_ratio = 1"):
        parameter_groups(model, 1e-3, 16)


# train losses and (step, loss, accuracy) of the evaluations of the run below
PINNED_LOSSES = [
    1.6191675066947937, 1.6715516448020935, 1.6236217617988586, 1.595847725868225,
    1.5933436751365662, 1.5676726698875427, 1.5325117707252502, 1.5161925554275513,
    1.4842158555984497, 1.5078687071800232, 1.4963952898979187, 1.4763501286506653,
    1.4438130855560303, 1.4793487787246704, 1.3741660714149475,
]  # fmt: skip
PINNED_EVALS = [
    (4, 1.6568066120147704, 0.35), (8, 1.588489441871643, 0.13),
    (12, 1.5624135780334472, 0.19), (13, 1.5525559902191162, 0.21),
    (15, 1.5340234422683716, 0.28),
]  # fmt: skip


def test_per_step_losses_and_evaluations_are_pinned(news):
    """A short run with LoRA dropout, LoRA+, accumulation (13 steps an epoch, the last of one
    batch), warmup, weight decay and evaluations inside and at the end of an epoch: a change to
    the loop must move none of its numbers. It ends holding the best (first) evaluation's
    weights."""
    model, train, val = make(news, batch_size=16)
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["fc1"]))
    config = TrainConfig(
        epochs=2, max_steps=15, grad_accum_steps=2, lr=1e-2, lora_plus_ratio=4, eval_every=4,
        log_every=1, warmup_ratio=0.2, weight_decay=0.01,
    )  # fmt: skip
    result = train_loop(model, train, val, config, seed=0, show_progress=False)
    losses = [e["loss"] for e in result.history if e["event"] == "train"]
    evals = [(e["step"], e["loss"], e["accuracy"]) for e in result.history if e["event"] == "eval"]
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-4)
    assert [(step, accuracy) for step, _, accuracy in evals] == [
        (step, accuracy) for step, _, accuracy in PINNED_EVALS
    ]
    assert [loss for _, loss, _ in evals] == pytest.approx([e[1] for e in PINNED_EVALS], rel=1e-4)
    assert result.best_step == 4 and result.best_metrics["accuracy"] == 0.35
    assert evaluate(model, val)["accuracy"] == 0.35


def test_console_shows_the_logged_mean_loss_and_says_so(news, capsys):
    model, train, val = make(news)
    config = TrainConfig(epochs=1, lr=1e-2, log_every=5)
    result = train_loop(model, train, val, config, seed=0, desc="news")
    lines = [line for line in capsys.readouterr().out.splitlines() if " loss " in line]
    logged = [e for e in result.history if e["event"] == "train"]
    assert len(lines) == len(logged) + 1  # every logged step, and the last step (13 of 13)
    for line, event in zip(lines, logged, strict=False):
        assert line.startswith(f"news: step {event['step']}/13 loss {event['loss']:.4g} ")
        assert "(mean of the last 5 steps)" in line
    assert lines[-1].startswith("news: step 13/13 ") and "(mean of the last 3 steps)" in lines[-1]


def test_resume_says_where_it_continues(news, tmp_path, capsys):
    config = TrainConfig(epochs=1, lr=1e-2, checkpoint_every=5)
    model, train, val = make(news)
    train_loop(model, train, val, config, seed=0, checkpoint_dir=tmp_path, show_progress=False)
    model, train, val = make(news)
    train_loop(model, train, val, config, seed=0, desc="news", resume=tmp_path / "step-10")
    assert "news: resuming from step 10 of 13\n" in capsys.readouterr().out
