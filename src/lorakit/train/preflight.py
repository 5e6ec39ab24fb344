"""Pre-flight checks of a causal-LM run: what will train, and whether the data teaches what it
should, said before the first step.

The mistakes these catch cost a whole run to find otherwise: target names that matched other
modules than meant, an adapter far larger than planned, a pad token equal to eos that masks the
end-of-turn token out of the labels (the model then never learns to stop), or data whose loss
falls on a sliver of its tokens. Each check is one line, printed and kept in the run directory
(``preflight.json``) as ``{"check", "value", "line"}``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import datasets
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit.data.causal import IGNORE_INDEX

ADAPTER_BYTES_PER_PARAMETER = 4  # adapters are saved in fp32


def lora_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that carry LoRA (either engine: both use PEFT's ``lora_A``)."""
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


def _check(check: str, value: Any, line: str) -> dict[str, Any]:
    return {"check": check, "value": value, "line": line}


def preflight_checks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: datasets.Dataset,
    end_of_turn: int,
    *,
    chat: bool,
    truncated: int = 0,
) -> list[dict[str, Any]]:
    """The checks of a model with LoRA about to train on ``train`` (input_ids, attention_mask,
    labels); ``end_of_turn`` is the token that should end each response."""
    targets = lora_module_names(model)
    kinds = Counter(name.rsplit(".", 1)[-1] for name in targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adapter_bytes = trainable * ADAPTER_BYTES_PER_PARAMETER
    checks = [
        _check("target_modules", dict(kinds),
               f"LoRA on {len(targets)} modules: "
               + ", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items()))),
        _check("trainable_parameters", trainable,
               f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.3f}%)"),
        _check("adapter_bytes", adapter_bytes,
               f"adapter file about {adapter_bytes / 2**20:.1f} MiB (fp32 weights)"),
    ]  # fmt: skip
    columns = train.with_format("torch")[:]
    labels, mask = columns["labels"], columns["attention_mask"].bool()
    targets_at = labels[:, 1:] != IGNORE_INDEX  # the first position is never predicted
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is not None and pad == eos:
        checks.append(_check(
            "pad_equals_eos", True,
            f"pad token {tokenizer.pad_token!r} is the eos token: labels are built from the "
            "attention mask, not from pad ids, so eos keeps its loss where it ends a text"))  # fmt: skip
    else:
        checks.append(_check("pad_equals_eos", False, f"pad token {tokenizer.pad_token!r} differs "
                             f"from eos {tokenizer.eos_token!r}"))  # fmt: skip
    ending = (labels[:, 1:] == end_of_turn).any(1)  # the first position is never predicted
    name = tokenizer.convert_ids_to_tokens(end_of_turn)
    share = float(ending.double().mean())
    what = "end-of-turn" if chat else "end (eos)"
    line = f"{what} token {name!r} is a label in {100 * share:.1f}% of training rows"
    if share < 1 and bool((labels[:, 1:] == IGNORE_INDEX).any()):  # rows, not packed text
        line += " (rows without it never teach the model to stop)"
    checks.append(_check("end_of_turn_in_labels", share, line))
    loss_share = float(targets_at.sum() / mask[:, 1:].sum().clamp(min=1))
    checks.append(_check(
        "loss_token_share", loss_share,
        f"{100 * loss_share:.1f}% of {int(mask.sum()):,} training tokens carry loss "
        f"({int(targets_at.sum()):,} targets in {labels.shape[0]:,} rows)"))  # fmt: skip
    if truncated:
        checks.append(_check("truncated_examples", truncated,
                             f"{truncated:,} examples longer than data.max_length were cut "
                             "(a prompt's start, else the end)"))  # fmt: skip
    return checks
