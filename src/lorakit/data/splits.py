"""Deterministic splits from a stable hash of the text, and a fingerprint of a DatasetDict.

A text's split depends on the text alone (after normalising case, Unicode form and whitespace),
never on row order, seed or machine: the same review lands in `test` everywhere, and duplicate
texts always share a split, so nothing leaks from train into test.
"""

from __future__ import annotations

import hashlib
import unicodedata

from datasets import DatasetDict

SPLITS = ("train", "validation", "test")
VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.1


def normalise(text: str) -> str:
    """The form a text is hashed in: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def bucket(text: str) -> float:
    """A number in [0, 1) fixed by the normalised text (the first 8 bytes of its SHA-256)."""
    digest = hashlib.sha256(normalise(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(
    text: str,
    validation_fraction: float = VALIDATION_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> str:
    """The split of this text: "train", "validation" or "test", about 80/10/10 by default."""
    position = bucket(text)
    if position >= 1.0 - test_fraction:
        return "test"
    if position >= 1.0 - test_fraction - validation_fraction:
        return "validation"
    return "train"


def carve_validation(text: str, validation_fraction: float) -> str:
    """For a train row of a dataset that has its own test split: "validation" or "train"."""
    return "validation" if bucket(text) < validation_fraction else "train"


def dataset_fingerprint(dataset_dict: DatasetDict) -> str:
    """A 16-hex-digit digest of split names, label names, texts and labels, stable anywhere."""
    digest = hashlib.sha256()
    for split in sorted(dataset_dict):
        dataset = dataset_dict[split]
        names = getattr(dataset.features["label"], "names", None) or []
        digest.update(f"\x1e{split}\x1d{'|'.join(names)}\x1d".encode())
        for text, label in zip(dataset["text"], dataset["label"], strict=True):
            digest.update(f"{text}\x1f{label}\x1e".encode())
    return digest.hexdigest()[:16]
