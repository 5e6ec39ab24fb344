"""The causal-LM recipes end to end on a tiny GPT-2 (2 layers, 64 wide, real BPE tokenizer)."""

import json
import re

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit.api as lk
from lorakit.cli import main
from lorakit.config import ConfigError
from lorakit.data import DataError, load_dataset
from lorakit.generate import generate
from lorakit.merge import merge
from lorakit.models.causal_lm import load_causal_lm
from lorakit.report.plots import curves_from_events, metric_name
from tiny_models import save_tiny_causal_lm

PROMPT = "The film is"
# the instruct recipe's settings for SmolLM2, back to the plain prompt format of the tiny GPT-2
GPT2_INSTRUCT = ["causal.chat=off", "lora.target_modules=c_attn,c_proj,c_fc", "train.lr=2e-3"]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A randomly initialised GPT-2 folder with a BPE tokenizer trained on 400 reviews."""
    texts = load_dataset("rotten-tomatoes")["train"]["text"][:400]
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    save_tiny_causal_lm(folder, texts, vocab_size=500, width=64)
    return folder


@pytest.fixture(scope="module")
def lm_run(tiny_gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "causal"
    overrides = [f"model.name={tiny_gpt2}", "data.max_train_samples=600", "causal.block_size=64",
                 "train.eval_every=0", "train.epochs=1", "compare=true",
                 "data.forgetting_on=bbc-news"]  # fmt: skip
    return lk.train("causal-lm", out=out, overrides=overrides), out


def test_causal_lm_run_lowers_perplexity_and_writes_the_contract(lm_run):
    summary, out = lm_run
    for name in ("config.toml", "environment.json", "metrics.jsonl", "summary.json",
                 "report.html", "plots/loss_accuracy.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    assert summary == json.loads((out / "summary.json").read_text()) | {"run_dir": str(out)}
    assert summary["task"] == "causal-lm"
    assert summary["test_perplexity"] < summary["base_test_perplexity"]
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["reload_lorakit_identical"] and summary["reload_peft_identical"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals and all(e["perplexity"] > 1 for e in evals)
    assert summary["best_validation"]["perplexity"] == min(e["perplexity"] for e in evals)


def test_adapter_loads_in_plain_peft_with_identical_logits(lm_run, tiny_gpt2):
    _, out = lm_run
    model, tokenizer = lk_generator(out)
    ids = tokenizer("A gorgeous, witty, seductive movie.", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        base_logits = base(ids).logits
        in_peft = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        expected = model(ids).logits
        assert torch.allclose(in_peft(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(base_logits, expected, atol=1e-3)  # the adapter changed it


def lk_generator(run_dir):
    from lorakit.recipes.causal_lm import load_generator

    return load_generator(run_dir)


def test_greedy_generation_equals_the_merged_model(lm_run, tmp_path):
    _, out = lm_run
    adapted = lk.generate(out, PROMPT, max_new_tokens=12, temperature=0)
    merged_dir = merge(out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    _, tokenizer = load_causal_lm(merged_dir)
    assert adapted == generate(merged, tokenizer, PROMPT, 12, temperature=0, stream=False)
    model, tokenizer = lk_generator(out)
    ids = tokenizer(tokenizer.bos_token + PROMPT, return_tensors="pt")["input_ids"]
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kwargs), merged.generate(ids, **kwargs))


def test_generate_cli_prints_the_continuation(lm_run, capsys):
    _, out = lm_run
    code = main(["generate", str(out), PROMPT, "--max-new-tokens", "8", "--temperature", "0"])
    printed = capsys.readouterr().out
    assert code == 0
    expected = lk.generate(out, PROMPT, max_new_tokens=8, temperature=0)
    assert printed.startswith(PROMPT) and printed.strip() == (PROMPT + expected).strip()


def test_sampling_is_repeatable_with_a_seed(lm_run):
    _, out = lm_run
    first = lk.generate(out, PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert first == lk.generate(out, PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)


def test_causal_runs_point_predict_to_generate_and_refuse_bad_settings(lm_run, capsys):
    _, out = lm_run
    assert main(["predict", str(out), "a text"]) == 2
    assert "lorakit generate" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="top_p"):
        lk.generate(out, PROMPT, top_p=1.5)


def test_instruct_verdicts_reports_verdict_accuracy(tiny_gpt2, tmp_path):
    overrides = [*GPT2_INSTRUCT, f"model.name={tiny_gpt2}", "data.max_train_samples=200", "data.max_length=48",
                 "train.epochs=1"]  # fmt: skip
    summary = lk.train("instruct", out=tmp_path / "run", overrides=overrides)
    assert 0 <= summary["test_verdict_accuracy"] <= 1
    assert 0 <= summary["base_test_verdict_accuracy"] <= 1
    assert summary["test_perplexity"] < summary["base_test_perplexity"]
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals and all(0 <= e["verdict_accuracy"] <= 1 for e in evals)
    # the run's plot shows the task: validation verdict accuracy, and the test figure
    curves = curves_from_events(events, metric_name(events, summary))
    assert curves.metric == "verdict_accuracy"
    assert [y for _, y in curves.validation_metric] == [e["verdict_accuracy"] for e in evals]
    assert curves.test_metric == summary["test_verdict_accuracy"]


def test_a_run_repeats_itself_with_its_seed(tiny_gpt2, tmp_path):
    """Same seed, same run: LoRA's random A matrices are drawn from the run's seed."""
    overrides = [*GPT2_INSTRUCT, f"model.name={tiny_gpt2}", "data.max_train_samples=64", "data.max_length=48",
                 "train.max_steps=4", "train.log_every=1"]  # fmt: skip

    def train_losses(out):
        lk.train("instruct", out=out, overrides=overrides)
        events = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        return [e["loss"] for e in events if e["event"] == "train"]

    first = train_losses(tmp_path / "a")
    torch.manual_seed(12345)  # whatever the global generator holds, the run must not care
    assert len(first) == 4 and train_losses(tmp_path / "b") == first


def test_select_by_verdict_accuracy_keeps_the_most_accurate_adapter(tiny_gpt2, tmp_path):
    overrides = [*GPT2_INSTRUCT, f"model.name={tiny_gpt2}", "data.max_train_samples=200", "data.max_length=48",
                 "train.epochs=2", "train.eval_every=5", "causal.select_by=verdict_accuracy"]  # fmt: skip
    summary = lk.train("instruct", out=tmp_path / "run", overrides=overrides)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [e for e in events if e["event"] == "eval"]
    best = max(evals, key=lambda e: e["verdict_accuracy"])  # the first of equals, as the loop
    # here the two figures pick different steps, so the test tells the criteria apart
    assert min(evals, key=lambda e: e["perplexity"])["step"] != best["step"]
    assert summary["best_step"] == best["step"]
    assert summary["best_validation"]["verdict_accuracy"] == best["verdict_accuracy"]
    with pytest.raises(ConfigError, match="select_by"):
        lk.train("causal-lm", out=tmp_path / "lm", overrides=[
            f"model.name={tiny_gpt2}", "causal.select_by=verdict_accuracy",
        ])  # fmt: skip


def test_compare_adds_a_full_fine_tuning_row(lm_run):
    summary, out = lm_run
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["method"].split()[0] for r in rows] == ["base", "LoRA", "full"]
    assert rows[2]["trainable_percent"] == 100
    assert rows[1]["test_perplexity"] == summary["test_perplexity"]


def test_forgetting_on_measures_other_text_before_and_after(lm_run):
    summary, out = lm_run
    base, tuned, full = json.loads((out / "comparison.json").read_text())
    assert summary["forgetting_on"] == "bbc-news"
    assert base["other_perplexity"] == summary["base_other_perplexity"]
    assert tuned["other_perplexity"] == summary["other_perplexity"] != base["other_perplexity"]
    assert full["other_perplexity"] > 1
    # the figure is the perplexity `lorakit eval RUN --data bbc-news` measures
    again = lk.evaluate(out, data="bbc-news")
    assert again["perplexity"] == pytest.approx(summary["other_perplexity"], rel=1e-6)


def test_instruction_file_trains_on_its_own_columns(tiny_gpt2, tmp_path):
    reviews = load_dataset("rotten-tomatoes")["train"].select(range(120))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(
        json.dumps({"question": f"Summarise: {t}", "answer": " " + t.split()[0]}) + "\n"
        for t in reviews["text"]
    ))  # fmt: skip
    overrides = [*GPT2_INSTRUCT, f"model.name={tiny_gpt2}", f"data.path={path}", "causal.prompt_column=question",
                 "causal.response_column=answer"]  # fmt: skip
    summary = lk.train("instruct", out=tmp_path / "run", overrides=overrides)
    assert summary["mode"] == "instruction" and "test_verdict_accuracy" not in summary
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"split": "validation"' in metrics and "verdict_accuracy" not in metrics
    assert summary["test_perplexity"] < summary["base_test_perplexity"]
    bad = [
        *GPT2_INSTRUCT,
        f"model.name={tiny_gpt2}",
        f"data.path={path}",
    ]  # the default columns are missing
    with pytest.raises(DataError, match="question"):
        lk.train("instruct", out=tmp_path / "bad", overrides=bad)


def test_padded_sequences_train_one_row_per_review(tiny_gpt2, tmp_path):
    """causal.packing = false: each review is its own row (eos review eos, cut at
    data.max_length), and padding is neither trained on nor counted in perplexity."""
    from transformers import AutoTokenizer

    overrides = [f"model.name={tiny_gpt2}", "data.max_train_samples=300", "causal.packing=false",
                 "data.max_length=24", "train.epochs=1", "train.eval_every=0"]  # fmt: skip
    summary = lk.train("causal-lm", out=tmp_path / "run", overrides=overrides)
    assert summary["test_perplexity"] < summary["base_test_perplexity"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    test_texts = list(load_dataset("rotten-tomatoes")["test"]["text"])
    ids = tokenizer(test_texts, add_special_tokens=False)["input_ids"]
    # every row predicts all of its tokens but the first (the eos that plays bos)
    assert summary["test_tokens"] == sum(min(len(row) + 2, 24) - 1 for row in ids)


def test_dry_run_counts_the_blocks_and_steps(tiny_gpt2):
    overrides = [f"model.name={tiny_gpt2}", "data.max_train_samples=600", "causal.block_size=64",
                 "train.epochs=2", "train.batch_size=8"]  # fmt: skip
    text = lk.dry_run("causal-lm", overrides)
    blocks = re.search(r"examples: train ([\d,]+), validation [\d,]+, test [\d,]+", text)
    assert blocks, text
    per_epoch = -(-int(blocks.group(1).replace(",", "")) // 8)
    assert f"steps: {per_epoch} per epoch x 2 epochs = {2 * per_epoch} optimizer steps" in text
