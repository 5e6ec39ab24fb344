"""The figures a run reports: perplexity, accuracy, verdict accuracy, the confusion matrix, ROUGE.

Every recipe takes its numbers from here, so a figure means the same in each summary.json:

- ``perplexity``: exp of the mean loss per target token (labels of -100 do not count), the loss
  summed over every token of the data before dividing, so batching and padding do not change it.
  ``evaluate_causal`` gives loss and perplexity over a loader, for the training loop.
- ``accuracy``: the share of predictions equal to their label; ``verdict_accuracy`` the share of
  prompts whose likeliest (or greedily generated) answer is the right one of a closed set.
- ``confusion_matrix``: counts, rows true labels and columns predictions; ``per_class_scores``
  each class's precision, recall and F1 from it.
- ``evaluate``: a classifier's loss and accuracy over a loader, with every prediction.
- ``rouge``: generated summaries against written ones, the mean F-measure of ROUGE-1, ROUGE-2
  and ROUGE-L (the ``rouge-score`` package, Porter stemming, as most summarization papers report).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from lorakit.data.causal import IGNORE_INDEX
from lorakit.nn.output_head import labeled_positions_loss

CAUSAL_INPUTS = ("input_ids", "attention_mask", "labels")


# ---------------------------------------------------------------- causal LMs: loss, perplexity
@torch.no_grad()
def causal_lm_loss(model: nn.Module, batches: Iterable[dict], accelerator=None) -> float:
    """Mean loss per target token over batches with input_ids/labels (and attention_mask),
    summed over every process's shard when ``accelerator`` runs several."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll = torch.zeros(2, dtype=torch.float64, device=device)  # (summed loss, target tokens)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if k in CAUSAL_INPUTS}
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if targets == 0:
            continue
        loss = labeled_positions_loss(model, batch, reduction="sum")
        nll += torch.stack(
            [loss.double(), torch.tensor(targets, dtype=torch.float64, device=device)]
        )
    if accelerator is not None and accelerator.num_processes > 1:
        nll = accelerator.reduce(nll, "sum")
    model.train(was_training)
    if nll[1] == 0:
        raise ValueError("the evaluation data has no target tokens (every label is -100)")
    return float(nll[0] / nll[1])


def _batches(dataset: datasets.Dataset, batch_size: int):
    formatted = dataset.with_format("torch")
    for start in range(0, formatted.num_rows, batch_size):
        yield formatted[start : start + batch_size]


def perplexity(model: nn.Module, dataset: datasets.Dataset, batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood per target token) over a dataset with input_ids/labels."""
    return math.exp(causal_lm_loss(model, _batches(dataset, batch_size)))


def evaluate_causal(model: nn.Module, loader, accelerator=None) -> dict[str, float]:
    """The training loop's evaluation of a causal LM: mean loss per target token and its
    perplexity, over every process's shard."""
    loss = causal_lm_loss(model, loader, accelerator)
    return {"loss": loss, "perplexity": math.exp(loss)}


# ---------------------------------------------------------------- classification
def accuracy(predictions: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """The share of predictions equal to their label."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if labels.size == 0:
        raise ValueError("accuracy needs at least one label")
    return float((predictions == labels).mean())


def confusion_matrix(labels: list[int], predictions: list[int], classes: int) -> list[list[int]]:
    """Counts: rows are true labels, columns predicted ones (summary.json's layout)."""
    matrix = np.zeros((classes, classes), dtype=int)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix.tolist()


def per_class_scores(matrix: list[list[int]], labels: list[str]) -> list[dict[str, Any]]:
    """Each class's ``precision`` (of the examples predicted as it, the share that are),
    ``recall`` (of its examples, the share found), ``f1`` and ``support`` (its examples), from a
    confusion matrix; 0 where a class is never predicted or never occurs."""
    counts = np.asarray(matrix, dtype=float)
    scores = []
    for index, label in enumerate(labels):
        hits, predicted, support = counts[index, index], counts[:, index].sum(), counts[index].sum()
        precision = float(hits / predicted) if predicted else 0.0
        recall = float(hits / support) if support else 0.0
        both = precision + recall
        f1 = 2 * precision * recall / both if both else 0.0
        scores.append({"label": label, "precision": precision, "recall": recall, "f1": f1,
                       "support": int(support)})  # fmt: skip
    return scores


# ---------------------------------------------------------------- summaries
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean F-measure of ROUGE-1, ROUGE-2 and ROUGE-L (longest common subsequence) over the
    pairs, each text lower-cased, cut at non-alphanumerics and stemmed (``use_stemmer=True``)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge needs at least one prediction and its reference")
    from rouge_score.rouge_scorer import RougeScorer  # imports nltk: about a second

    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


# ---------------------------------------------------------------- classifiers: loss, accuracy
@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Classification loss and accuracy over a loader, with every prediction and label.

    With an ``accelerator`` running several processes, each evaluates its shard and the
    figures cover the whole split (``gather_for_metrics`` drops the padding duplicates)."""
    if accelerator is not None and accelerator.num_processes > 1:
        return _evaluate_gathered(model, loader, accelerator)
    was_training = model.training
    model.eval()
    total_loss, count, predictions, labels = 0.0, 0, [], []
    device = next(model.parameters()).device
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        size = len(batch["labels"])
        total_loss += float(out.loss) * size
        count += size
        predictions += out.logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation split is empty")
    return {
        "loss": total_loss / count,
        "accuracy": accuracy(predictions, labels),
        "predictions": predictions,
        "labels": labels,
    }


def _evaluate_gathered(model, loader, accelerator: Accelerator) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    losses, predictions, labels = [], [], []
    for batch in loader:
        logits = model(**batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        gathered = accelerator.gather_for_metrics((loss, logits.argmax(-1), batch["labels"]))
        for kept, part in zip((losses, predictions, labels), gathered, strict=True):
            kept.append(part.cpu())
    model.train(was_training)
    if not losses:
        raise ValueError("evaluation split is empty")
    loss, predicted, truth = (torch.cat(parts) for parts in (losses, predictions, labels))
    return {
        "loss": float(loss.mean()),
        "accuracy": float((predicted == truth).float().mean()),
        "predictions": predicted.tolist(),
        "labels": truth.tolist(),
    }
