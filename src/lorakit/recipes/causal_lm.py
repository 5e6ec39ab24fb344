"""Pipeline for the causal-LM recipes (`causal-lm`, `instruct`, `summarize`): LoRA on a causal LM.

1. Load the base model (`model.name`: "tiny-gpt2", a folder or a hub id) and measure its test
   perplexity.
2. Build the data: `causal.mode = "lm"` packs the review text into blocks of
   `causal.block_size` (`causal.packing = false`: one padded row per text); `"instruction"`
   makes prompt/response rows whose loss counts only the response (the built-in
   rotten-tomatoes verdicts, or a .jsonl/.csv file in `data.path`).
3. Add LoRA (engine `lorakit` or `peft`), train with lorakit's loop, keep the adapter of the best
   validation perplexity.
4. Test; save the adapter; reload it into a fresh base with both engines and compare logits.
   `compare = true` adds a full fine-tuning row beside LoRA in comparison.json / .md.
5. A finished run: `remeasure` (`lorakit eval`) measures the saved adapter again;
   `load_generator` and `chat_prompting` serve `lorakit generate`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from lorakit.config import CausalConfig, Config, ConfigError, load_config
from lorakit.data import dataset_fingerprint, load_dataset, split_of
from lorakit.data.causal import (
    eos_id,
    instruction_dataset,
    load_instruction_file,
    pack_texts,
    pad_id,
    padded_lm_dataset,
    rotten_tomatoes_verdicts,
    token_ids,
    trim_padding,
    verdict_choices,
)
from lorakit.data.chat import (
    chat_dataset,
    has_chat_template,
    pair_conversations,
    read_conversations,
    render,
    shorten_user_turn,
    stop_ids,
)
from lorakit.models.causal_lm import (
    ChoiceScorer,
    greedy_continuations,
    load_causal_lm,
    max_positions,
)
from lorakit.models.gguf import gguf_source
from lorakit.models.transformer import public_name, weights_bytes
from lorakit.nn.frozen_base import bf16_inference, set_model_dropout
from lorakit.nn.output_head import labeled_positions_loss
from lorakit.recipes import is_merged_model, read_merge_record
from lorakit.recipes.base import Recipe, lora_report
from lorakit.recipes.pretrain_tiny_gpt2 import ensure_base_model
from lorakit.rundir import RunDir, read_run_summary, write_json_atomic
from lorakit.train import engines
from lorakit.train.loop import train_loop
from lorakit.train.metrics import evaluate_causal, perplexity, rouge
from lorakit.train.preflight import preflight_checks

SPLITS = ("train", "validation", "test")
# the figures beyond perplexity that a run may measure, base and tuned (TaskScores)
TASK_FIGURES = ("verdict_accuracy", "generated_verdict_accuracy", "end_of_turn_rate", "rouge1",
                "rouge2", "rougeL")  # fmt: skip
VERDICT_NEW_TOKENS = 4  # a verdict word and the end-of-turn token, with room to spare
INSTRUCTION_FILE_TYPES = (".jsonl", ".csv")
RELOAD_TOLERANCE = 1e-4
EVAL_SPLITS = ("test", "validation")  # the splits `lorakit eval` measures a run on


def causal_section(config: Config) -> CausalConfig:
    return config.causal or CausalConfig()


# ---------------------------------------------------------------- data
def _limit(split: datasets.Dataset, limit: int | None, config: Config) -> datasets.Dataset:
    """A fixed random subset of ``limit`` rows (from the run's seed), or the whole split."""
    if not limit:
        return split
    split = split.shuffle(seed=config.seed)
    return split.select(range(min(len(split), limit)))


def _split_by_key(rows: datasets.Dataset, keys: list[str], path) -> datasets.DatasetDict:
    """~80/10/10 by a hash of each row's key (its prompt), as lorakit splits any data file."""
    where = [split_of(key) for key in keys]
    dsd = datasets.DatasetDict(
        {s: rows.select([i for i, w in enumerate(where) if w == s]) for s in SPLITS}
    )
    empty = [s for s in SPLITS if dsd[s].num_rows == 0]
    if empty:
        raise ConfigError(
            f"data.path: {path} has {rows.num_rows} rows, too few to fill the "
            f"{', '.join(empty)} split(s) (~80/10/10 by prompt); give at least ~50 rows"
        )
    return dsd


def _instruction_examples(config: Config, chat: bool) -> datasets.DatasetDict:
    """The examples' splits: `messages` (chat turns) or `prompt`/`response` columns, from an
    instruction file (split by prompt hash), a built-in prompt/response set (aclsum) or the
    rotten-tomatoes verdicts."""
    causal = causal_section(config)
    path = config.data.path
    if path and Path(path).suffix.lower() in INSTRUCTION_FILE_TYPES:
        conversations = read_conversations(path)
        if conversations is not None:
            if not chat:
                raise ConfigError(
                    f"data.path: {path} holds chat `messages`, which need a model with a chat "
                    "template; set causal.chat = 'auto' and a chat model (model.name = 'smollm2')"
                )
            rows = datasets.Dataset.from_dict({"messages": conversations})
            return _split_by_key(rows, [_first_user_turn(c) for c in conversations], path)
        pairs = load_instruction_file(path, causal.prompt_column, causal.response_column)
        return _split_by_key(pairs, pairs["prompt"], path)
    dsd = load_dataset(
        config.data.source,
        text_column=config.data.text_column,
        label_column=config.data.label_column,
    )
    if {"prompt", "response"} <= set(dsd["train"].column_names):
        return dsd
    try:
        return rotten_tomatoes_verdicts(dsd, chat=chat)
    except ValueError as err:
        raise ConfigError(
            f"data: {err}, or an instruction file ({', '.join(INSTRUCTION_FILE_TYPES)}) with "
            "prompt/response columns or chat `messages` in data.path"
        ) from None


def _first_user_turn(conversation: list[dict[str, str]]) -> str:
    return next((t["content"] for t in conversation if t["role"] == "user"), "")


def uses_chat(config: Config, tokenizer) -> bool:
    """Whether instruction examples are rendered with the tokenizer's chat template."""
    chat = causal_section(config).chat
    if causal_section(config).mode != "instruction":
        return False
    if chat == "on" and not has_chat_template(tokenizer):
        raise ConfigError(
            f"causal.chat: 'on' but {config.model.name}'s tokenizer has no chat template; set "
            "causal.chat = 'auto' (plain prompt/response rows) or use a chat model"
        )
    return chat == "on" or (chat == "auto" and has_chat_template(tokenizer))


def conversations_of(examples: datasets.Dataset, system: str | None) -> list:
    """Each example as chat turns: its `messages`, or its prompt/response as one exchange."""
    if "messages" in examples.column_names:
        return examples["messages"]
    return pair_conversations(examples["prompt"], examples["response"], system)


def responses_of(examples: datasets.Dataset) -> list[str]:
    """Each example's reference answer: its `response`, or its conversation's last turn (the
    assistant's)."""
    if "messages" in examples.column_names:
        return [conversation[-1]["content"] for conversation in examples["messages"]]
    return list(examples["response"])


def build_data(config: Config, tokenizer, positions: int) -> dict[str, Any]:
    """Tokenized splits (`input_ids`, `attention_mask`, `labels`), the raw validation and test
    examples, how the examples were rendered, the rows' length (`max_length`: what test prompts
    are cut to as well) and the fingerprint of the source data."""
    causal = causal_section(config)
    if causal.mode == "lm":
        if causal.block_size > positions:
            raise ConfigError(
                f"causal.block_size: {causal.block_size} exceeds the model's {positions} "
                f"positions; set causal.block_size <= {positions}"
            )
        dsd = load_dataset(
            config.data.source,
            text_column=config.data.text_column,
            label_column=config.data.label_column,
        )
        dsd["train"] = _limit(dsd["train"], config.data.max_train_samples, config)
        dsd["validation"] = _limit(dsd["validation"], config.data.max_eval_samples, config)
        if causal.packing:
            splits = {s: pack_texts(tokenizer, dsd[s]["text"], causal.block_size) for s in SPLITS}
        else:
            max_length = min(config.data.max_length, positions)
            splits = {s: padded_lm_dataset(tokenizer, dsd[s]["text"], max_length) for s in SPLITS}
        return {
            "splits": splits, "val_pairs": None, "test_pairs": None, "chat": False,
            "end_of_turn": eos_id(tokenizer), "truncated": 0, "max_length": positions,
            "fingerprint": dataset_fingerprint(dsd),
        }  # fmt: skip
    chat = uses_chat(config, tokenizer)
    examples = _instruction_examples(config, chat)
    examples["train"] = _limit(examples["train"], config.data.max_train_samples, config)
    examples["validation"] = _limit(examples["validation"], config.data.max_eval_samples, config)
    max_length = min(config.data.max_length, positions)
    if chat:
        rows = {
            s: chat_dataset(tokenizer, conversations_of(examples[s], causal.system_prompt),
                            max_length)
            for s in SPLITS
        }  # fmt: skip
        splits = {s: rows[s].dataset for s in SPLITS}
        end_of_turn = rows["train"].end_of_turn
        truncated = rows["train"].truncated
    else:
        splits = {
            s: instruction_dataset(
                tokenizer, examples[s]["prompt"], examples[s]["response"], max_length
            )
            for s in SPLITS
        }
        end_of_turn, truncated = eos_id(tokenizer), 0
    return {
        "splits": splits, "val_pairs": examples["validation"], "test_pairs": examples["test"],
        "chat": chat, "end_of_turn": end_of_turn, "truncated": truncated,
        "max_length": max_length, "fingerprint": _examples_fingerprint(examples),
    }  # fmt: skip


def _examples_fingerprint(examples: datasets.DatasetDict) -> str:
    """A 16-hex-digit digest of every split's examples (prompts and responses, or turns)."""
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(f"\x1e{split}\x1d".encode())
        columns = ["messages"] if "messages" in examples[split].column_names else [
            "prompt", "response"]  # fmt: skip
        for row in zip(*(examples[split][c] for c in columns), strict=True):
            digest.update(json.dumps(row, sort_keys=True).encode() + b"\x1e")
    return digest.hexdigest()[:16]


def _positions(model) -> int:
    positions = max_positions(model)
    if positions is None:
        raise ConfigError(
            f"{type(model).__name__}'s config gives no maximum length (n_positions or "
            "max_position_embeddings); use a model whose config does"
        )
    return positions


# ---------------------------------------------------------------- evaluation
def _has_verdicts(pairs: datasets.Dataset | None) -> bool:
    """Whether prompt/response pairs are verdicts (a `choice` column) that can be scored."""
    return pairs is not None and "choice" in pairs.column_names


class TaskScores:
    """What a causal run measures beyond perplexity, on the same prompts for the base model and
    the tuned one: verdict accuracy by the answers' likelihood (verdict data); for a chat model,
    greedy generation's verdict accuracy and how often it closes its turn by itself; ROUGE of
    generated responses against the references (``causal.rouge``)."""

    def __init__(self, config: Config, data: dict[str, Any], tokenizer, split: str = "test"):
        causal = causal_section(config)
        max_length = data["max_length"]  # prompts are cut as the rows were
        self.examples = data[f"{'val' if split == 'validation' else 'test'}_pairs"]
        self.tokenizer, self.chat = tokenizer, data["chat"]
        self.batch_size = config.train.eval_batch_size
        self.verdicts = _has_verdicts(self.examples)
        self.rouge = causal.rouge and self.examples is not None
        self.max_new_tokens = causal.max_new_tokens
        if not (self.verdicts or self.rouge):
            return
        # prompts cut as training cut its rows, leaving room for the answer
        answer_room = VERDICT_NEW_TOKENS if self.verdicts else self.max_new_tokens
        self.prompt_room = max_length - answer_room
        if self.prompt_room < 1:
            raise ConfigError(
                f"causal.max_new_tokens: {answer_room} new tokens leave no room for a prompt in "
                f"{max_length} positions; lower causal.max_new_tokens or raise data.max_length"
            )
        prompts = self._prompts(causal.system_prompt)
        if self.verdicts:
            self.scorer = ChoiceScorer(
                tokenizer, prompts, verdict_choices(self.chat), max_length, self.batch_size,
                start=[] if self.chat else None,
            )  # fmt: skip
            self.truth = torch.tensor(self.examples["choice"])
        self.prompt_ids = token_ids(tokenizer, prompts)
        if not self.chat:  # the end of a plain prompt is kept, as instruction_dataset keeps it
            room = self.prompt_room - 1
            self.prompt_ids = [[eos_id(tokenizer), *ids[len(ids) - room :][:room]]
                               for ids in self.prompt_ids]  # fmt: skip

    def _prompts(self, system: str | None) -> list[str]:
        """Each example's prompt as the model sees it: the chat rendering up to the assistant's
        turn, or the plain prompt."""
        if not self.chat:
            return list(self.examples["prompt"])
        return [self._chat_prompt(conversation[:-1])
                for conversation in conversations_of(self.examples, system)]  # fmt: skip

    def _chat_prompt(self, turns: list) -> str:
        """The turns rendered with the assistant's turn opened; a user turn too long for the
        prompt's room loses its start, as a training row does."""
        text = render(self.tokenizer, turns, open_turn=True)
        excess = len(token_ids(self.tokenizer, [text])[0]) - self.prompt_room
        if excess > 0:
            text = render(self.tokenizer, shorten_user_turn(self.tokenizer, turns, excess),
                          open_turn=True)  # fmt: skip
        return text

    def likelihood_accuracy(self, model) -> float:
        return float((self.scorer(model).argmax(1) == self.truth).double().mean())

    def __call__(self, model) -> dict[str, float]:
        figures: dict[str, float] = {}
        if self.chat and self.verdicts:
            figures.update(self._generated_verdicts(model))
        elif self.verdicts:
            figures["verdict_accuracy"] = self.likelihood_accuracy(model)
        if self.rouge:
            figures.update(self._rouge(model))
        return figures

    def _generate(self, model, max_new_tokens: int, watch=()):
        return greedy_continuations(
            model, self.prompt_ids, max_new_tokens, stop_ids(self.tokenizer, self.chat),
            pad_id(self.tokenizer),
            self.batch_size, watch=watch,
        )  # fmt: skip

    def _generated_verdicts(self, model) -> dict[str, float]:
        """Verdicts by likelihood and by greedy generation from one pass: the first generated
        token's log-probabilities score the one-token answers."""
        words = verdict_choices(chat=True)
        single = self.scorer.single_tokens()
        out = self._generate(model, VERDICT_NEW_TOKENS, watch=single or ())
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip(" .!\n").lower()
                 for ids in out.tokens]  # fmt: skip
        picked = torch.tensor([words.index(t) if t in words else -1 for t in texts])
        if single is None:
            likelihood = self.likelihood_accuracy(model)
        else:
            likelihood = float((out.first_log_probs.argmax(1) == self.truth).double().mean())
        return {
            "verdict_accuracy": likelihood,
            "generated_verdict_accuracy": float((picked == self.truth).double().mean()),
            "end_of_turn_rate": sum(out.ended) / len(out.ended),
        }

    def _rouge(self, model) -> dict[str, float]:
        out = self._generate(model, self.max_new_tokens)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out.tokens]
        figures = rouge(texts, responses_of(self.examples))
        figures["end_of_turn_rate"] = sum(out.ended) / len(out.ended)
        return figures


def validation_figures(data: dict[str, Any], scores: TaskScores | None):
    """The loop's evaluation: loss and perplexity, and for verdict data the verdict accuracy
    on the validation prompts as well (scored the way the test split is), so the run's curves
    show the task itself; `causal.select_by` picks which of them keeps the best adapter."""
    if scores is None or not scores.verdicts:
        return evaluate_causal

    def evaluate(model, loader, accelerator=None) -> dict[str, float]:
        figures = evaluate_causal(model, loader, accelerator)
        figures["verdict_accuracy"] = scores.likelihood_accuracy(model)
        return figures

    return evaluate


def _loaders(splits: dict[str, datasets.Dataset], config: Config) -> dict[str, DataLoader]:
    generator = torch.Generator().manual_seed(config.seed)
    return {
        s: DataLoader(
            splits[s],
            batch_size=config.train.batch_size if s == "train" else config.train.eval_batch_size,
            shuffle=s == "train",
            generator=generator if s == "train" else None,
            num_workers=config.train.num_workers,
            collate_fn=trim_padding,
        )
        for s in SPLITS
    }


# ---------------------------------------------------------------- the run
def _model_to_train(config: Config):
    """(model, tokenizer) of ``model.name``, with ``model.dropout`` applied when set: the start
    of both the LoRA run and the full fine-tuning beside it."""
    model, tokenizer = load_base(config)
    if config.model.dropout is not None:
        set_model_dropout(model, config.model.dropout)
    return model, tokenizer


def load_base(config: Config):
    """(model, tokenizer) of ``model.name`` (and ``model.gguf_file``), as loaded for training."""
    return load_causal_lm(
        ensure_base_model(config.model.name),
        gguf_file=config.model.gguf_file,
        quantize=config.model.quantize,
    )


class CausalLM(Recipe):
    """A causal LM plus LoRA, measured by test perplexity, and by the task's own figures where
    the data has them (verdict accuracy, generation closing its turn, ROUGE)."""

    def load_data(self) -> str:
        """Loads the base model first: the data is tokenized with its tokenizer."""
        config = self.config
        self.base, self.tokenizer = _model_to_train(config)
        self.base_path = self.base.name_or_path  # the folder the weights came from
        self.base_name = public_name(self.base_path)  # a hub cache folder: its hub id
        self.positions = _positions(self.base)
        self.data = build_data(config, self.tokenizer, self.positions)
        select_by = causal_section(config).select_by
        if select_by == "verdict_accuracy" and not _has_verdicts(self.data["val_pairs"]):
            raise ConfigError(
                "causal.select_by: 'verdict_accuracy' needs verdict data (causal.mode = "
                "'instruction' on the built-in rotten-tomatoes verdicts); set causal.select_by = "
                "'perplexity'"
            )
        self.other_text = _other_text(config, self.tokenizer, self.positions)
        self.test_scores = TaskScores(config, self.data, self.tokenizer)
        self.val_scores = TaskScores(config, self.data, self.tokenizer, split="validation")
        return self.data["fingerprint"]

    def measure(self, model, split: str = "test") -> dict[str, float]:
        """Perplexity and the task's figures on the test (or validation) split, in the
        precision training uses."""
        scores = self.test_scores if split == "test" else self.val_scores
        batch_size = self.config.train.eval_batch_size
        with bf16_inference(model, self.config.train.use_bf16):
            figures = {"perplexity": perplexity(model, self.data["splits"][split], batch_size)}
            figures.update(scores(model))
            if self.other_text is not None and split == "test":
                figures["other_perplexity"] = perplexity(model, self.other_text, batch_size)
        return figures

    def build_model(self, run_dir: RunDir, resume: Path | None):
        """Measures the base model on the test split, adds LoRA to it, and runs the pre-flight
        checks."""
        config, model = self.config, self.base
        started = time.monotonic()
        self.base_figures = self.measure(model)
        print(f"{config.run_name}: base model {config.model.name}: "
              f"{_figures_line(self.base_figures)} ({time.monotonic() - started:.0f} s)",
              flush=True)  # fmt: skip
        torch.manual_seed(config.seed)  # LoRA's A matrices start random: from the run's seed
        model = engines.apply_lora(
            model, config.lora, base_name=self.base_name, task_type="CAUSAL_LM"
        )
        checks = preflight_checks(
            model, self.tokenizer, self.data["splits"]["train"], self.data["end_of_turn"],
            chat=self.data["chat"], truncated=self.data["truncated"],
        )  # fmt: skip
        for check in checks:
            print(f"{config.run_name}: pre-flight: {check['line']}", flush=True)
        write_json_atomic(run_dir.path / "preflight.json", checks)
        return model

    def trainable_line(self, trainable: int, total: int) -> str:
        return (f"{self.config.run_name}: LoRA ({self.config.lora.engine}): {trainable:,} of "
                f"{total:,} parameters trainable ({100 * trainable / total:.3f}%)")  # fmt: skip

    def loaders(self) -> dict[str, DataLoader]:
        return _loaders(self.data["splits"], self.config)

    def loop_options(self) -> dict[str, Any]:
        return {
            "desc": self.config.run_name,
            "metric": causal_section(self.config).select_by,
            "evaluate_fn": validation_figures(self.data, self.val_scores),
            "loss_fn": labeled_positions_loss,
        }

    def test(self, model, loaders: dict) -> dict[str, Any]:
        figures = self.measure(model)
        figures["loss"] = math.log(figures["perplexity"])
        return figures

    @torch.no_grad()
    def reload_checks(self, model, loaders: dict, run_dir: RunDir, test) -> dict[str, Any]:
        """Load the saved adapter into a fresh base with each engine: the same logits as
        trained?"""
        split = self.data["splits"]["test"]
        batch = split.select(range(min(8, split.num_rows)))[:]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        reference = model(**inputs).logits
        checks: dict[str, Any] = {}
        for engine in ("lorakit", "peft"):
            reloaded, _ = self.load_adapted(run_dir.path, engine)
            diff = float((reloaded(**inputs).logits - reference).abs().max())
            checks[f"reload_{engine}_identical"] = diff <= RELOAD_TOLERANCE
            checks[f"reload_{engine}_max_abs_diff"] = diff
        return checks

    def summary_base(self, run_dir: RunDir) -> tuple[str, int | None]:
        # the name load_causal_lm (and lorakit merge) resolves
        return self.config.model.name, weights_bytes(self.base_path) or None

    def summary_figures(self, result, test, checks, counts) -> dict[str, Any]:
        trainable, total = counts
        base = self.base_figures
        figures = {
            "task": "causal-lm",
            "mode": causal_section(self.config).mode,
            "chat_template": self.data["chat"],
            "evaluation_precision": "bf16" if self.config.train.use_bf16 else "fp32",
            "quantize": self.config.model.quantize,
            "base_model_path": self.base_path,
            "base_model_gguf": gguf_source(self.base_path),
            "trainer": "lorakit",
            "test_perplexity": test["perplexity"],
            "base_test_perplexity": base["perplexity"],
            "perplexity_ratio": test["perplexity"] / base["perplexity"],
            "test_loss": math.log(test["perplexity"]),
            "trainable_percent": round(100 * trainable / total, 4),
            "steps": result.steps,
            "test_tokens": _target_tokens(self.data["splits"]["test"]),
            **checks,
        }
        for name in TASK_FIGURES:
            if name in test:
                figures[f"test_{name}"] = test[name]
                figures[f"base_test_{name}"] = base[name]
        if "verdict_accuracy" in test:
            figures["test_majority_accuracy"] = _majority(self.data["test_pairs"])
        if "other_perplexity" in test:
            figures["forgetting_on"] = self.config.data.forgetting_on
            figures["other_perplexity"] = test["other_perplexity"]
            figures["base_other_perplexity"] = base["other_perplexity"]
        return figures

    def compare(self, run_dir: RunDir, summary: dict[str, Any]) -> None:
        config = self.config
        rows = comparison_rows(self, summary)
        run_dir.write_comparison(rows, title=f"{config.run_name}: LoRA vs full fine-tuning")
        summary["full_ft_test_perplexity"] = rows[-1]["test_perplexity"]

    def closing_line(self, summary: dict[str, Any], run_dir: RunDir) -> str:
        extra = "".join(
            f", {name.replace('_', ' ')} {summary[f'base_test_{name}']:.4f} -> "
            f"{summary[f'test_{name}']:.4f}"
            for name in TASK_FIGURES if f"test_{name}" in summary
        )  # fmt: skip
        return (f"{self.config.run_name}: test perplexity {summary['base_test_perplexity']:.2f} -> "
                f"{summary['test_perplexity']:.2f}{extra} (best step {summary['best_step']}); "
                f"adapter in {run_dir.adapter_dir}")  # fmt: skip

    def split_sizes(self) -> dict[str, int]:
        """Training examples: token blocks (packing) or one row a text."""
        return {name: len(self.data["splits"][name]) for name in SPLITS}

    def trainable_report(self) -> str:
        """Loads the real model."""
        model, _ = load_base(self.config)
        model = engines.apply_lora(
            model, self.config.lora, base_name=public_name(model.name_or_path),
            task_type="CAUSAL_LM",
        )  # fmt: skip
        return lora_report(self.config.model.name, model)

    # ------------------------------------------------------------ a finished run
    def reload_base(self):
        # what summary.json's base_model names
        return load_base(self.config)

    def predictor(self, run_dir: Path):
        raise ConfigError(
            f"{run_dir} is a causal-LM run: `lorakit predict` is for classification runs; use "
            f'`lorakit generate {run_dir} "a prompt"` (lorakit.api.generate)'
        )

    def remeasure(self, run_dir: Path, data: str | None = None, split: str = "test"):
        """The run's figures (perplexity, task scores) measured again with base + the saved
        adapter, on its own data or on ``data`` (a file or a built-in name)."""
        if split not in EVAL_SPLITS:
            raise ConfigError(
                f"split: a causal-LM run is measured on {' or '.join(EVAL_SPLITS)}, not {split!r}"
            )
        if data is not None:
            self.config = self.config.model_copy(update={"data": self.config.data.reading(data)})
        self.load_data()
        model = engines.load(self.base, Path(run_dir) / "adapter").eval()
        figures = self.measure(model, split)
        return {
            "split": split, "dataset": self.config.data.source,
            "examples": len(self.data["splits"][split]),
            "loss": math.log(figures["perplexity"]), **figures,
        }  # fmt: skip


def _other_text(config: Config, tokenizer, positions: int) -> datasets.Dataset | None:
    """The test split of ``data.forgetting_on`` as packed blocks of plain text (however the
    run reads its own data), or None when the setting is off."""
    source = config.data.forgetting_on
    if source is None:
        return None
    data = config.data.reading(source, text_column="text", max_train_samples=1, forgetting_on=None)
    causal = causal_section(config).model_copy(update={"mode": "lm", "packing": True})
    other = config.model_copy(update={"data": data, "causal": causal})
    return build_data(other, tokenizer, positions)["splits"]["test"]


def _figures_line(figures: dict[str, float]) -> str:
    return ", ".join(
        [f"test perplexity {figures['perplexity']:.2f}"]
        + [f"{name.replace('_', ' ')} {figures[name]:.4f}" for name in TASK_FIGURES
           if name in figures]
    )  # fmt: skip


def _target_tokens(split: datasets.Dataset) -> int:
    return int((split[:]["labels"][:, 1:] != -100).sum())


def _majority(pairs: datasets.Dataset) -> float:
    choices = pairs["choice"]
    return max(choices.count(c) for c in set(choices)) / len(choices)


def comparison_rows(recipe: CausalLM, summary: dict[str, Any]) -> list[dict]:
    """Base, LoRA and full fine-tuning of the same model on the same data, one row each."""
    config = recipe.config
    causal = causal_section(config)
    model, _ = _model_to_train(config)
    for p in model.parameters():
        p.requires_grad_(True)
    full_train = config.train.model_copy(
        update={"lr": causal.full_lr or config.train.lr / 10, "checkpoint_every": 0}
    )
    loaders = _loaders(recipe.data["splits"], config)
    print(
        f"{config.run_name}: full fine-tuning for the comparison (lr {full_train.lr:g})", flush=True
    )
    result = train_loop(
        model, loaders["train"], loaders["validation"], full_train, seed=config.seed,
        metric=causal.select_by, desc="full fine-tuning",
        evaluate_fn=validation_figures(recipe.data, recipe.val_scores),
        loss_fn=labeled_positions_loss,
    )  # fmt: skip
    full = recipe.measure(model.eval())
    total = sum(p.numel() for p in model.parameters())  # the base model's own parameters

    def row(method, trainable, figures, seconds):
        values = {
            "method": method,
            "trainable_params": trainable,
            "trainable_percent": round(100 * trainable / total, 4),
            "test_perplexity": figures["perplexity"],
            "vs_base": figures["perplexity"] / summary["base_test_perplexity"],
        }
        values.update({f"test_{name}": figures[name] for name in TASK_FIGURES if name in figures})
        if "other_perplexity" in figures:
            values["other_perplexity"] = figures["other_perplexity"]
        values["train_seconds"] = seconds
        return values

    tuned = {name: summary[f"test_{name}"] for name in ("perplexity", *TASK_FIGURES)
             if f"test_{name}" in summary}  # fmt: skip
    if "other_perplexity" in summary:
        tuned["other_perplexity"] = summary["other_perplexity"]
    return [
        row("base (no training)", 0, recipe.base_figures, 0.0),
        row(f"LoRA r={config.lora.r} ({config.lora.engine})", summary["trainable_params"],
            tuned, summary["train_seconds"]),
        row("full fine-tuning", total, full, result.train_seconds),
    ]  # fmt: skip


# ---------------------------------------------------------------- inference on a finished run
def load_generator(folder: str | Path):
    """(model, tokenizer): the run's base model with its adapter, or the model `lorakit merge`
    wrote to ``folder``, ready for generation."""
    if is_merged_model(folder):
        model, tokenizer = load_causal_lm(folder)
        return model.eval(), tokenizer
    return CausalLM.of_run(folder).load_adapted(folder)


def chat_prompting(folder: str | Path) -> tuple[bool, str | None]:
    """Whether the run rendered its examples with the chat template, and its system prompt
    (the run's summary.json and config.toml, or a merged folder's merge.json)."""
    if is_merged_model(folder):
        record = read_merge_record(folder)
        return bool(record.get("chat_template")), record.get("system_prompt")
    config = load_config(Path(folder) / "config.toml")
    chat = bool(read_run_summary(folder).get("chat_template"))
    return chat, causal_section(config).system_prompt


RECIPE = CausalLM
