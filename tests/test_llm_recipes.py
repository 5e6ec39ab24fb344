"""The chat-LLM recipes (`instruct`, `summarize`) end to end on a tiny random Llama with
SmolLM2's real tokenizer and chat template: data files in both formats, the built-in verdicts,
the pre-flight checks, the task figures of the base and the tuned model, and the adapter's
reload with both engines."""

import json
import random

import pytest

import lorakit.api as lk
from lorakit.config import ConfigError
from tiny_models import FILLER, NEGATIVE, POSITIVE, save_tiny_causal_lm

QUESTION = "Is this review fresh or rotten?\n\nReview: {review}"


def reviews(rows: int, seed: int = 0) -> list[tuple[str, str]]:
    """(review, verdict) pairs: filler words, two words of the verdict's class, the row's
    number (every prompt unique)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(rows):
        verdict, words = ("fresh", POSITIVE) if i % 2 else ("rotten", NEGATIVE)
        pairs.append((" ".join(rng.sample(FILLER, 4) + rng.sample(words, 2)) + f" {i}", verdict))
    return pairs


@pytest.fixture(scope="module")
def chats_jsonl(tmp_path_factory):
    """60 conversations in a `messages` JSONL file, a system turn in every third."""
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    lines = []
    for i, (review, verdict) in enumerate(reviews(60)):
        turns = [{"role": "user", "content": QUESTION.format(review=review)},
                 {"role": "assistant", "content": verdict}]  # fmt: skip
        if i % 3 == 0:
            turns.insert(0, {"role": "system", "content": "Answer in one word."})
        lines.append(json.dumps({"messages": turns}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory):
    """60 prompt/response pairs in a CSV file."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    rows = [f'"{QUESTION.format(review=r)}",{v}' for r, v in reviews(60, seed=1)]
    path.write_text("prompt,response\n" + "\n".join(rows) + "\n")
    return path


def small_run(model_dir, *extra: str) -> list[str]:
    return [f"model.name={model_dir}", "data.max_train_samples=48", "data.max_eval_samples=16",
            "train.max_steps=3", "train.batch_size=8", "train.eval_batch_size=8",
            "train.eval_every=0", "train.checkpoint_every=0", *extra]  # fmt: skip


def preflight(run_dir) -> dict[str, dict]:
    checks = json.loads((run_dir / "preflight.json").read_text())
    assert all(set(c) == {"check", "value", "line"} and "\n" not in c["line"] for c in checks)
    return {c["check"]: c for c in checks}


@pytest.fixture(scope="module")
def messages_run(tiny_llama_dir, chats_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "messages"
    overrides = small_run(tiny_llama_dir, f"data.path={chats_jsonl}", "causal.rouge=true",
                          "causal.max_new_tokens=8")  # fmt: skip
    return lk.train("instruct", out=out, overrides=overrides), out


def test_a_messages_file_trains_on_the_assistant_turns(messages_run):
    summary, out = messages_run
    assert summary["chat_template"] is True and summary["mode"] == "instruction"
    assert summary["reload_lorakit_identical"] and summary["reload_peft_identical"]
    assert summary["base_model_gguf"] is None  # an ordinary folder, not a converted GGUF file
    assert summary["steps"] == 3
    checks = preflight(out)
    assert checks["end_of_turn_in_labels"]["value"] == 1.0
    assert (
        "'<|im_end|>' is a label in 100.0% of training rows"
        in (checks["end_of_turn_in_labels"]["line"])
    )
    assert 0 < checks["loss_token_share"]["value"] < 0.5  # the prompt and template carry none
    assert checks["target_modules"]["value"] == {
        name: 2
        for name in (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        )  # fmt: skip
    }
    assert checks["trainable_parameters"]["value"] == summary["trainable_params"]
    assert checks["pad_equals_eos"]["value"] is True  # SmolLM2 pads with <|im_end|>


def test_a_messages_file_is_scored_by_rouge_and_the_end_of_turn_rate(messages_run):
    summary, _ = messages_run
    for name in ("rouge1", "rouge2", "rougeL", "end_of_turn_rate"):
        for prefix in ("test_", "base_test_"):
            assert 0 <= summary[prefix + name] <= 1, prefix + name
    assert "test_verdict_accuracy" not in summary  # a file has no verdict choices


def test_a_prompt_response_csv_is_rendered_with_the_chat_template(tiny_llama_dir, pairs_csv,
                                                                 tmp_path):  # fmt: skip
    summary = lk.train("instruct", out=tmp_path / "run",
                       overrides=small_run(tiny_llama_dir, f"data.path={pairs_csv}"))  # fmt: skip
    assert summary["chat_template"] is True
    checks = preflight(tmp_path / "run")
    assert checks["end_of_turn_in_labels"]["value"] == 1.0
    assert checks["loss_token_share"]["value"] < 0.5
    assert summary["reload_lorakit_identical"] and summary["reload_peft_identical"]


def test_built_in_verdicts_measure_likelihood_and_generated_accuracy(tiny_llama_dir, tmp_path):
    """The whole rotten-tomatoes test split (1,281 prompts), base and tuned: the slowest test
    here."""
    summary = lk.train("instruct", out=tmp_path / "run", overrides=small_run(tiny_llama_dir))
    assert summary["chat_template"] is True
    for name in ("verdict_accuracy", "generated_verdict_accuracy", "end_of_turn_rate"):
        for prefix in ("test_", "base_test_"):
            assert 0 <= summary[prefix + name] <= 1, prefix + name
    assert 0.4 < summary["test_majority_accuracy"] <= 1
    assert preflight(tmp_path / "run")["end_of_turn_in_labels"]["value"] == 1.0
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals and all(0 <= e["verdict_accuracy"] <= 1 for e in evals)


def test_summarize_reports_rouge_for_base_and_tuned(tiny_llama_dir, tmp_path):
    overrides = [f"model.name={tiny_llama_dir}", "data.max_train_samples=8",
                 "data.max_eval_samples=4", "train.max_steps=2", "train.batch_size=4",
                 "train.eval_batch_size=16", "train.eval_every=0", "train.checkpoint_every=0",
                 "causal.max_new_tokens=8", "data.max_length=256"]  # fmt: skip
    summary = lk.train("summarize", out=tmp_path / "run", overrides=overrides)
    assert summary["chat_template"] is True and summary["steps"] == 2
    for name in ("test_rougeL", "base_test_rougeL", "test_rouge1", "test_end_of_turn_rate"):
        assert 0 <= summary[name] <= 1, name
    assert summary["reload_lorakit_identical"] and summary["reload_peft_identical"]


# ---------------------------------------------------------------- settings refused
@pytest.fixture(scope="module")
def gpt2_without_template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    texts = [" ".join(r) for r in reviews(60)]
    save_tiny_causal_lm(folder, texts, vocab_size=300, width=32)
    return folder


def test_chat_on_without_a_chat_template_is_a_one_line_config_error(gpt2_without_template,
                                                                   tmp_path):  # fmt: skip
    overrides = small_run(gpt2_without_template, "causal.chat=on",
                          "lora.target_modules=c_attn")  # fmt: skip
    with pytest.raises(ConfigError, match="no chat template") as err:
        lk.train("instruct", out=tmp_path / "run", overrides=overrides)
    assert "\n" not in str(err.value) and "causal.chat" in str(err.value)


def test_a_messages_file_with_chat_off_is_a_one_line_config_error(tiny_llama_dir, chats_jsonl,
                                                                 tmp_path):  # fmt: skip
    overrides = small_run(tiny_llama_dir, f"data.path={chats_jsonl}", "causal.chat=off")
    with pytest.raises(ConfigError, match="messages") as err:
        lk.train("instruct", out=tmp_path / "run", overrides=overrides)
    assert "\n" not in str(err.value) and "causal.chat" in str(err.value)


# ---------------------------------------------------------------- the real SmolLM2
@pytest.mark.slow
def test_smollm2_adapter_reloads_in_plain_peft_and_answers_end_their_turn(
    smollm2_folder, chats_jsonl, tmp_path
):
    """The one test on the real SmolLM2-135M-Instruct: two LoRA steps on a small messages
    file, then the adapter in plain PEFT on a fresh transformers model."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.data.chat import render
    from lorakit.models.causal_lm import greedy_continuations, load_causal_lm
    from lorakit.recipes.causal_lm import load_generator

    model, tokenizer = load_causal_lm("smollm2")
    assert model.name_or_path == str(smollm2_folder) and tokenizer.chat_template
    del model
    overrides = ["model.name=smollm2", f"data.path={chats_jsonl}", "data.max_train_samples=8",
                 "data.max_eval_samples=4", "train.max_steps=2", "train.batch_size=4",
                 "train.eval_batch_size=8", "train.eval_every=0", "train.checkpoint_every=0"]  # fmt: skip
    summary = lk.train("instruct", out=tmp_path / "run", overrides=overrides)
    assert summary["chat_template"] is True and summary["steps"] == 2
    assert summary["base_model_gguf"]["gguf_file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert summary["reload_lorakit_identical"] and summary["reload_peft_identical"]

    adapted, tokenizer = load_generator(tmp_path / "run")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer(render(tokenizer, question, open_turn=True), add_special_tokens=False)
    ids = torch.tensor([ids["input_ids"]])
    in_peft = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smollm2_folder), str(tmp_path / "run" / "adapter")
    ).eval()
    with torch.no_grad():
        assert torch.allclose(in_peft(ids).logits, adapted(ids).logits, atol=1e-4)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = greedy_continuations(adapted, ids.tolist(), 40, [end], end)
    assert out.ended[0] and out.tokens[0], tokenizer.decode(out.tokens[0])
