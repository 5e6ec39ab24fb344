"""llama.cpp (llama-cpp-python) with a run exported by `lorakit export`, against lorakit itself.

A causal-LM run (``--run``; without one, a small ``instruct`` run of SmolLM2-135M is trained
first, ``--set`` overrides on top) is exported twice: its adapter as a LoRA GGUF, loaded beside
the base's own GGUF (SmolLM2's Q4_1 file for a SmolLM2 run; a plain base folder is written as
an f32 GGUF first), and merged, as f16 and q8_0 GGUF files that llama.cpp runs alone. On the
run's test prompts (the chat rendering, as the run trained) lorakit's base + adapter generates
``--new-tokens`` tokens greedily (no stop), and each llama.cpp setting is measured two ways:

- next-token agreement: llama.cpp reads the prompt and lorakit's tokens and predicts each next
  token (its argmax at every position); the share that equals lorakit's. A single difference
  does not carry over to later positions.
- identical prefix: llama.cpp's own greedy continuation; the share of tokens before the first
  one that differs from lorakit's.

llama-cpp-python is installed first when it is missing (PyPI has no wheel for Linux x86-64 CPython
3.11: a source build, 17 minutes on 2 busy cores).

    python benchmarks/llamacpp_agreement.py          # table + benchmarks/results/llamacpp_agreement.json
    python benchmarks/llamacpp_agreement.py --run runs/instruct-... --prompts 100
    OMP_NUM_THREADS=1 python benchmarks/llamacpp_agreement.py --run /tmp/tiny-run \\
        --prompts 2 --new-tokens 4 --out /tmp/llamacpp_agreement.json      # a check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lorakit.api as lk
from lorakit.data.causal import pad_id
from lorakit.export import export, write_model_gguf
from lorakit.generate import prompt_ids
from lorakit.models.causal_lm import greedy_continuations
from lorakit.models.gguf import gguf_source
from lorakit.recipes import recipe_of_run
from lorakit.recipes.causal_lm import chat_prompting, conversations_of
from lorakit.rundir import read_run_summary

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, markdown_table  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SMALL_RUN = ["data.max_train_samples=256", "data.max_eval_samples=32", "train.max_steps=30",
             "train.eval_every=0", "train.checkpoint_every=0"]  # fmt: skip


def ensure_llama_cpp() -> None:
    """Build and install llama-cpp-python when it is missing (no wheel for this platform on
    PyPI: a source build, about 17 minutes on 2 cores; GGML_NATIVE off keeps it portable)."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return
    print(f"building {LLAMA_CPP_PYTHON} from source (about 17 minutes) ...", flush=True)
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", LLAMA_CPP_PYTHON], env=env,
                   check=True)  # fmt: skip


def train_small_run(folder: Path, overrides: list[str]) -> Path:
    print(f"training a small instruct run in {folder / 'run'} ...", flush=True)
    lk.train("instruct", out=folder / "run", overrides=[*SMALL_RUN, *overrides])
    return folder / "run"


def run_test_prompts(run_dir: Path, count: int) -> list[list[int]]:
    """The token ids of the run's first ``count`` test prompts, as the run's model reads them."""
    from lorakit.data.causal import token_ids
    from lorakit.data.chat import render

    recipe = recipe_of_run(run_dir)
    recipe.load_data()
    tokenizer, examples = recipe.tokenizer, recipe.data["test_pairs"]
    if examples is None:
        raise SystemExit(f"{run_dir} trained on plain text (causal.mode = lm): it has no prompts")
    examples = examples.select(range(min(count, len(examples))))
    chat, system = chat_prompting(run_dir)
    if chat:
        texts = [render(tokenizer, turns[:-1], open_turn=True)
                 for turns in conversations_of(examples, system)]  # fmt: skip
        return token_ids(tokenizer, texts)
    return [prompt_ids(tokenizer, prompt) for prompt in examples["prompt"]]


def llama_cpp(model_path: Path, lora_path: Path | None, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(model_path), lora_path=lora_path and str(lora_path),
                 n_ctx=n_ctx, logits_all=True, seed=0, verbose=False)  # fmt: skip


def agreement(llm, prompts: list[list[int]], expected: list[list[int]]) -> dict[str, float]:
    """Next-token agreement (lorakit's tokens read in) and identical prefix (llama.cpp's own)."""
    import numpy as np

    agree = prefix = total = 0
    for ids, tokens in zip(prompts, expected, strict=True):
        llm.reset()
        llm.eval(ids + tokens[:-1])
        predicted = np.asarray(llm.scores[len(ids) - 1 : len(ids) - 1 + len(tokens)]).argmax(-1)
        agree += int((predicted == np.asarray(tokens)).sum())
        own = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            own.append(int(token))
            if len(own) == len(tokens):
                break
        same = next(
            (i for i, (a, b) in enumerate(zip(own, tokens, strict=True)) if a != b), len(tokens)
        )
        prefix += same
        total += len(tokens)
    return {"next_token_agreement": agree / total, "identical_prefix": prefix / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a causal-LM run (default: train a small one)")
    parser.add_argument("--set", action="append", default=[], help="overrides of the small run")
    parser.add_argument("--prompts", type=int, default=50, help="test prompts")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "llamacpp_agreement.json")
    args = parser.parse_args()
    ensure_llama_cpp()
    work = Path(tempfile.mkdtemp(prefix="llamacpp-agreement-"))
    run_dir = args.run or train_small_run(work, args.set)
    summary = read_run_summary(run_dir)

    start = time.perf_counter()
    lora_gguf = export(run_dir, work / "adapter.gguf", format="gguf")
    source = gguf_source(summary["base_model_path"])
    model, tokenizer = recipe_of_run(run_dir).load_adapted(run_dir, "lorakit")
    model.eval()
    if source:
        base_gguf, base_label = Path(source["gguf_file"]), Path(source["gguf_file"]).name
    else:  # a plain base folder: its f32 GGUF
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(summary["base_model_path"])
        base_gguf = write_model_gguf(base, Path(summary["base_model_path"]), work / "base.gguf",
                                     "f32")  # fmt: skip
        base_label = "base f32 GGUF"
    settings = {f"{base_label} + LoRA GGUF (f32)": (base_gguf, lora_gguf)}
    for outtype in ("f16", "q8_0"):
        merged = export(run_dir, work / f"merged-{outtype}.gguf", format="gguf-merged",
                        outtype=outtype)  # fmt: skip
        settings[f"merged GGUF ({outtype})"] = (merged, None)
    export_s = time.perf_counter() - start

    prompts = run_test_prompts(run_dir, args.prompts)
    # lorakit's batched greedy generation, not stopped at the end of a turn
    expected = greedy_continuations(model, prompts, args.new_tokens, (), pad_id(tokenizer)).tokens
    n_ctx = max(len(ids) for ids in prompts) + args.new_tokens + 8
    rows = []
    for name, (path, lora_path) in settings.items():
        started = time.perf_counter()
        llm = llama_cpp(path, lora_path, n_ctx)
        figures = agreement(llm, prompts, expected)
        llm.close()
        rows.append({"setting": name, "prompts": len(prompts), "tokens": len(prompts) *
                     args.new_tokens, **figures, "seconds": time.perf_counter() - started})  # fmt: skip

    print(markdown_table(rows, {"setting": "", "prompts": "d", "tokens": "d",
                                "next_token_agreement": ".4f", "identical_prefix": ".4f",
                                "seconds": ".1f"}))  # fmt: skip
    import llama_cpp as llama_cpp_module

    record = {
        "run_dir": str(run_dir), "base_model": summary.get("base_model"),
        "new_tokens": args.new_tokens, "export_seconds": export_s, "rows": rows,
        "llama_cpp_python": llama_cpp_module.__version__, "machine": machine(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
