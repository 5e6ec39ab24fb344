"""Text to token ids with a model's tokenizer, once per dataset, cached on disk.

`datasets.map(batched=True)` writes each split to an Arrow file keyed by the data's fingerprint,
the tokenizer and `max_length`, so a second run (or an epoch) never tokenizes again. Batches are
padded per batch (`DataCollatorWithPadding`) and grouped by length, so short reviews are not
padded to the longest text in the dataset.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding
from transformers.trainer_pt_utils import LengthGroupedSampler

from .splits import dataset_fingerprint


def cache_dir() -> Path:
    root = os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit"
    return Path(root) / "tokenized"


def tokenize_splits(
    dsd: datasets.DatasetDict, tokenizer, max_length: int, use_cache: bool = True
) -> datasets.DatasetDict:
    """Adds `input_ids`, `attention_mask` (and `token_type_ids` where the model has them)."""
    key = "|".join(
        [dataset_fingerprint(dsd), tokenizer.name_or_path, type(tokenizer).__name__,
         str(len(tokenizer)), str(max_length)]
    )  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_dir() / digest
    if use_cache:
        folder.mkdir(parents=True, exist_ok=True)

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return datasets.DatasetDict(
        {
            name: split.map(
                encode,
                batched=True,
                desc=f"tokenize {name}",
                cache_file_name=str(folder / f"{name}.arrow") if use_cache else None,
                load_from_cache_file=use_cache,
            )
            for name, split in dsd.items()
        }
    )


def classification_loaders(
    tokenized: datasets.DatasetDict,
    tokenizer,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    num_workers: int = 0,
) -> dict[str, DataLoader]:
    """Train batches grouped by length (shuffled mega-batches); eval batches sorted by length."""
    collator = DataCollatorWithPadding(tokenizer)
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids", "label")
               if c in tokenized["train"].column_names]  # fmt: skip
    loaders = {}
    for name, split in tokenized.items():
        split = split.select_columns(columns).rename_column("label", "labels")
        lengths = [len(ids) for ids in split["input_ids"]]
        if name == "train":
            sampler = LengthGroupedSampler(
                batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)
            )
            loaders[name] = DataLoader(
                split, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                num_workers=num_workers,
            )  # fmt: skip
        else:
            order = sorted(range(len(split)), key=lengths.__getitem__)
            loaders[name] = DataLoader(
                split.select(order), batch_size=eval_batch_size, collate_fn=collator
            )
    return loaders
