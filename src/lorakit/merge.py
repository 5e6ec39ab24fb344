"""`lorakit merge RUN_DIR OUT_DIR`: the adapter written into the base weights, as a standalone
model folder that needs no adapter (and no PEFT) to load.

```python
from lorakit.merge import merge
merge("runs/sentiment-...", "merged/")   # AutoModelForSequenceClassification.from_pretrained("merged/")
```

What loads each kind (``load`` in ``OUT_DIR/merge.json`` says it too):
- transformers classifiers (``sentiment``, ``topics``, ``classify``, the seeds): plain
  transformers (``AutoModelForSequenceClassification``, ``AutoTokenizer``), and lorakit:
  ``lorakit predict OUT_DIR``, ``lorakit eval OUT_DIR``;
- causal LMs (``task = "causal-lm"``): ``AutoModelForCausalLM``, and ``lorakit generate OUT_DIR``
  (``merge.json`` keeps whether the run used its chat template, and its system prompt);
- the ``classic`` recipe's GloVe classifier, which is not a transformers model, in its own
  format (``model.safetensors``, ``config.json``, ``vocab.txt``): lorakit only, ``lorakit
  predict OUT_DIR``, ``lorakit eval OUT_DIR``, or ``lorakit.models.classic.load_classic``.
A merged classifier (either kind) is served by ``lorakit serve --adapter NAME=OUT_DIR``, beside
the adapters on the server's base, as a model of its own.

Before anything is kept, the saved folder is loaded back and its outputs on a few real texts are
compared with base + adapter: the largest absolute difference goes into ``OUT_DIR/merge.json``,
and above ``TOLERANCE`` the merge fails. A run on a quantized base (``model.quantize``) merges
into the dequantized full-precision weights and is compared with the quantized base + adapter. ``merge.json`` also keeps the run's data settings and
test accuracy, so ``lorakit eval OUT_DIR`` evaluates on the run's data. The folder is written
under a temporary name and renamed when complete, so OUT_DIR is never half written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lorakit import lora
from lorakit.config import Config, ConfigError, load_config
from lorakit.recipes import MERGE_RECORD
from lorakit.rundir import read_run_summary

TOLERANCE = 1e-4
INT8_TOLERANCE = 0.01  # of the largest |output|: an int8 base also rounds its inputs
CLASSIC_LOADER = "lorakit.models.classic.load_classic"
LOADS = {  # what loads a merged folder, by the class or function that reads it
    CLASSIC_LOADER: f"lorakit predict/eval MERGED_DIR, or {CLASSIC_LOADER}(MERGED_DIR)",
    "AutoModelForSequenceClassification": "transformers' AutoModelForSequenceClassification, "
    "or lorakit predict/eval MERGED_DIR",
    "AutoModelForCausalLM": "transformers' AutoModelForCausalLM, or lorakit generate MERGED_DIR",
}
SAMPLE_SIZE = 8
# Used when the run's own data cannot be read (a moved file) and for causal-LM runs.
FALLBACK_TEXTS = [
    "A gorgeous, witty, seductive movie.",
    "The plot is nothing but boilerplate clichés from start to finish.",
    "Shares in the carmaker rose after it reported higher profits for the quarter.",
    "The striker scored twice as the home side won the cup final.",
    "Parliament will vote on the new budget next week.",
    "The new phone has a bigger screen and a longer battery life.",
]


class MergeError(ConfigError):
    """A merge that cannot be done or whose result does not match base + adapter."""


# ---------------------------------------------------------------- inputs
def _read_run(run_dir: Path) -> tuple[Config, dict[str, Any]]:
    for name in ("config.toml", "summary.json", "adapter/" + lora.CONFIG_NAME):
        if not (run_dir / name).is_file():
            raise MergeError(
                f"{run_dir} is not a finished run directory (no {name}); give the folder "
                "`lorakit train` wrote, e.g. runs/sentiment-20250101-120000"
            )
    return load_config(run_dir / "config.toml"), read_run_summary(run_dir)


def _check_out_dir(out_dir: Path, run_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"{out_dir} is a file; give a folder for the merged model")
    resolved, run = out_dir.resolve(), run_dir.resolve()
    if resolved == run or resolved in run.parents or run in resolved.parents:
        raise MergeError(f"{out_dir} overlaps the run directory {run_dir}; choose another folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise MergeError(
            f"{out_dir} exists and is not empty; choose another folder, or pass --force "
            "(force=True) to replace it"
        )


def sample_texts(config: Config, summary: dict[str, Any]) -> tuple[list[str], str]:
    """A few texts to compare outputs on: the run's test split, else a fixed set."""
    if summary.get("task") != "causal-lm":
        try:
            from lorakit.data import load_dataset

            dsd = load_dataset(
                config.data.source,
                text_column=config.data.text_column,
                label_column=config.data.label_column,
            )
            texts = [t for t in dsd["test"]["text"][:SAMPLE_SIZE] if t.strip()]
            if texts:
                return texts, f"{config.data.source} test split"
        except Exception:  # the data moved or needs a network: the check still runs
            pass
    return FALLBACK_TEXTS, "lorakit.merge.FALLBACK_TEXTS"


# ---------------------------------------------------------------- the two model formats
def _merge_classic(model, vocab, run_dir: Path, config: Config, summary, texts, tmp: Path):
    from lorakit.models.classic import collate, load_classic, save_classic

    batch = collate([{"input_ids": vocab.encode(t, config.data.max_length)} for t in texts])
    reference = model(**batch).logits
    merged = lora.merge_and_unload(model)
    save_classic(merged, vocab, tmp, labels=summary["labels"], merged_from=str(run_dir))
    reloaded, _, _ = load_classic(tmp)
    return reference, reloaded.eval()(**batch).logits, CLASSIC_LOADER


def _merge_transformers(model, tokenizer, config: Config, summary, texts, tmp: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lorakit.models.quantize import dequantize_model

    causal = summary.get("task") == "causal-lm"
    auto_class = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=config.data.max_length, return_tensors="pt"
    )
    reference = model(**batch).logits
    # a quantized base (model.quantize): the update goes into the dequantized full-precision
    # weights, and the merged model is saved in full precision
    merged = lora.merge_and_unload(dequantize_model(model))
    merged.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    reloaded = auto_class.from_pretrained(tmp).eval()
    return reference, reloaded(**batch).logits, auto_class.__name__


# ---------------------------------------------------------------- merge
@torch.no_grad()
def merge(run_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Merge the run's adapter into its base model; write a standalone model folder to
    ``out_dir`` (refused when it exists and is not empty, unless ``force``). Returns ``out_dir``."""
    from lorakit.models.classic import Vocabulary
    from lorakit.recipes import recipe_of_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config, summary = _read_run(run_dir)
    _check_out_dir(out_dir, run_dir, force)
    texts, texts_from = sample_texts(config, summary)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, no permission
        raise MergeError(
            f"cannot make {out_dir.parent} ({error.strerror}); choose another folder"
        ) from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.merging-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the result should not be
    try:
        # merge_and_unload works on lorakit's layers: loaded with lorakit's engine
        model, tokenizer = recipe_of_run(run_dir).load_adapted(run_dir, "lorakit")
        if isinstance(tokenizer, Vocabulary):  # the classic recipe's GloVe classifier
            reference, merged, loads_with = _merge_classic(
                model, tokenizer, run_dir, config, summary, texts, tmp
            )
        else:
            reference, merged, loads_with = _merge_transformers(
                model, tokenizer, config, summary, texts, tmp
            )
        diff = float((reference.float() - merged.float()).abs().max())
        tolerance = _tolerance(config, reference)
        if not diff <= tolerance:
            raise MergeError(
                f"the merged model's outputs differ from base + adapter by {diff:.3g} "
                f"(more than {tolerance:g}) on {len(texts)} texts; nothing was written"
            )
        record = {
            "run_dir": str(run_dir.resolve()),
            "recipe": summary.get("recipe"),
            "task": summary.get("task"),
            "base_model": summary.get("base_model"),
            "engine": summary.get("engine"),
            "quantize": config.model.quantize,
            "loads_with": loads_with,
            "load": LOADS[loads_with],
            "texts": len(texts),
            "texts_from": texts_from,
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "data": config.data.model_dump(mode="json"),  # for `lorakit eval MERGED_DIR`
            "eval_batch_size": config.train.eval_batch_size,
            "test_accuracy": summary.get("test_accuracy"),
            **_prompting(config, summary),
            "lorakit_version": lora.lorakit_version(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {run_dir} into {out_dir}; max |difference| {diff:.2e} on {len(texts)} "
          f"texts; load it with {LOADS[loads_with]}", flush=True)  # fmt: skip
    return out_dir


def _tolerance(config: Config, reference: torch.Tensor) -> float:
    """``TOLERANCE``; on an int8 base ``INT8_TOLERANCE`` of the largest output: LLM.int8()
    rounds the inputs of every product to int8 as well, which full-precision weights do not
    (an NF4 base computes with its dequantized weights, as the merged model does)."""
    if config.model.quantize == "int8":
        return max(TOLERANCE, INT8_TOLERANCE * float(reference.float().abs().max()))
    return TOLERANCE


def _prompting(config: Config, summary: dict[str, Any]) -> dict[str, Any]:
    """A causal LM's prompt shape, for `lorakit generate MERGED_DIR`: whether the run rendered
    its examples with the chat template, and its system prompt."""
    if summary.get("task") != "causal-lm":
        return {}
    system = config.causal.system_prompt if config.causal else None
    return {"chat_template": bool(summary.get("chat_template")), "system_prompt": system}


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing folder is moved aside first, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
