"""`lorakit generate`, `eval` and `merge` on a chat run: a tiny random Llama with SmolLM2's
tokenizer and chat template, instruction-tuned for two steps on chat `messages`."""

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit.api as lk
from lorakit.cli import main
from lorakit.config import ConfigError
from lorakit.data.chat import end_of_turn_id, stop_ids
from lorakit.generate import generate, prompt_ids
from lorakit.merge import merge
from lorakit.recipes.causal_lm import load_generator

PROMPT = "Is this review fresh or rotten? A moving, funny film."
PROMPTS = [PROMPT, "Summarize: the plot is thin.", "Say hello."]
WORDS = "moving funny dull tedious superb clumsy brilliant lifeless witty awful".split()
LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def write_chats(path, rows=60):
    """Chat examples: a user asks about a review, the assistant answers with a verdict."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            word = WORDS[i % len(WORDS)]
            verdict = "fresh" if i % len(WORDS) % 2 == 0 else "rotten"
            messages = [
                {"role": "user", "content": f"Review {i}: a {word} film. Fresh or rotten?"},
                {"role": "assistant", "content": verdict},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_run(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-run")
    overrides = [f"model.name={tiny_llama_dir}", f"data.path={write_chats(folder / 'chats.jsonl')}",
                 "data.max_length=64", "data.max_eval_samples=8", "train.max_steps=2",
                 "train.batch_size=8", "train.eval_batch_size=8", "train.bf16=false",
                 "train.checkpoint_every=0"]  # fmt: skip
    summary = lk.train("instruct", out=folder / "run", overrides=overrides)
    assert summary["chat_template"] is True
    return folder / "run"


def rendered_ids(tokenizer, prompt, system=None):
    turns = [{"role": "system", "content": system}] if system else []
    text = tokenizer.apply_chat_template(
        [*turns, {"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def greedy_text(model, tokenizer, ids, max_new_tokens=12):
    stops = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- the prompt the model sees
def test_a_chat_prompt_is_the_template_with_the_assistant_turn_open(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = prompt_ids(tokenizer, "hi", chat=True)
    assert ids == rendered_ids(tokenizer, "hi")[0].tolist()
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # the template's, once
    assert ids[1] != ids[0]
    with_system = tokenizer.decode(
        prompt_ids(tokenizer, "hi", chat=True, system_prompt="Be brief.")
    )
    assert "Be brief." in with_system and "SmolLM" not in with_system
    assert "SmolLM" in tokenizer.decode(ids)  # unset: the template's own system turn


def test_raw_and_plain_prompts_get_no_chat_markup(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = tokenizer("The film is", add_special_tokens=False)["input_ids"]
    # raw on a chat run: the text as given (SmolLM2's bos <|im_start|> opens a turn: not added)
    assert prompt_ids(tokenizer, "The film is", chat=True, raw=True) == text
    # a run without the template trained on rows that begin with eos
    assert prompt_ids(tokenizer, "The film is") == [tokenizer.eos_token_id, *text]
    assert prompt_ids(tokenizer, "", chat=True, raw=True) == [tokenizer.eos_token_id]
    end = end_of_turn_id(tokenizer)
    assert stop_ids(tokenizer, chat=True) == sorted({tokenizer.eos_token_id, end})


# ---------------------------------------------------------------- generate
def test_greedy_generation_answers_the_chat_rendered_prompt(chat_run):
    text = lk.generate(chat_run, PROMPT, max_new_tokens=12, temperature=0)
    assert text == lk.generate(chat_run, PROMPT, max_new_tokens=12, temperature=0)
    model, tokenizer = load_generator(chat_run)
    assert text == greedy_text(model, tokenizer, rendered_ids(tokenizer, PROMPT))
    assert "<|im" not in text


def test_raw_continues_the_text_as_given(chat_run):
    raw = lk.generate(chat_run, PROMPT, max_new_tokens=12, temperature=0, raw=True)
    model, tokenizer = load_generator(chat_run)
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert raw == greedy_text(model, tokenizer, ids)
    assert raw != lk.generate(chat_run, PROMPT, max_new_tokens=12, temperature=0)


def test_sampling_repeats_with_a_seed(chat_run):
    def sample(seed):
        return lk.generate(chat_run, PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.9,
                           seed=seed)  # fmt: skip

    first = sample(3)
    assert first == sample(3) and first != sample(4)


def test_generation_stops_at_the_end_of_turn_and_streams_without_it(chat_run):
    """The head is made to pick <|im_end|> at the third new token: two tokens come back."""
    model, tokenizer = load_generator(chat_run)
    end, calls = end_of_turn_id(tokenizer), []

    def end_the_turn_at_the_third_token(module, inputs, logits):
        calls.append(logits.shape)
        if len(calls) == 3:
            logits[..., end] = logits.max() + 100
        return logits

    hook = model.get_output_embeddings().register_forward_hook(end_the_turn_at_the_third_token)
    pieces = []
    try:
        text = generate(model, tokenizer, PROMPT, 20, temperature=0, on_text=pieces.append,
                        chat=True)  # fmt: skip
    finally:
        hook.remove()
    assert len(calls) == 3  # the prompt, then one step per new token: stopped at <|im_end|>
    new = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 1 <= len(new) <= 2 and "<|im_end|>" not in text
    assert "".join(pieces) == text + "\n"  # streamed as returned, and a closing newline


def test_a_run_with_a_system_prompt_generates_after_it(chat_run, tmp_path):
    run = shutil.copytree(chat_run, tmp_path / "run")
    config = (run / "config.toml").read_text()
    assert "[causal]" in config
    config = config.replace("[causal]\n", '[causal]\nsystem_prompt = "Answer in one word."\n', 1)
    (run / "config.toml").write_text(config)
    text = lk.generate(run, PROMPT, max_new_tokens=12, temperature=0)
    model, tokenizer = load_generator(run)
    ids = rendered_ids(tokenizer, PROMPT, system="Answer in one word.")
    assert text == greedy_text(model, tokenizer, ids)


def test_the_cli_prints_the_answer_alone_and_a_raw_continuation_after_its_prompt(chat_run, capsys):
    args = ["generate", str(chat_run), PROMPT, "--temperature", "0", "--max-new-tokens", "8"]
    assert main(args) == 0
    answer = lk.generate(chat_run, PROMPT, max_new_tokens=8, temperature=0)
    assert capsys.readouterr().out == answer + "\n"
    assert main([*args, "--raw"]) == 0
    continued = lk.generate(chat_run, PROMPT, max_new_tokens=8, temperature=0, raw=True)
    assert capsys.readouterr().out == PROMPT + continued + "\n"


def test_generate_refuses_a_classifier_run_naming_the_recipes(chat_run, tmp_path):
    run = shutil.copytree(chat_run, tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(summary | {"task": "classification"}))
    with pytest.raises(ConfigError, match="causal-lm, instruct, summarize"):
        lk.generate(run, PROMPT)


# ---------------------------------------------------------------- eval
def test_eval_measures_the_runs_test_figures_again(chat_run, capsys):
    summary = json.loads((chat_run / "summary.json").read_text())
    figures = lk.evaluate(chat_run)
    assert figures["split"] == "test" and figures["examples"] > 0
    assert figures["perplexity"] == pytest.approx(summary["test_perplexity"], rel=1e-6)
    assert figures["loss"] == pytest.approx(math.log(summary["test_perplexity"]), rel=1e-6)
    assert figures["recorded_test_perplexity"] == summary["test_perplexity"]
    assert main(["eval", str(chat_run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["perplexity"] == pytest.approx(figures["perplexity"], rel=1e-9)


def test_eval_measures_validation_and_other_data(chat_run, tmp_path):
    summary = json.loads((chat_run / "summary.json").read_text())
    validation = lk.evaluate(chat_run, split="validation")["perplexity"]
    assert validation == pytest.approx(summary["best_validation"]["perplexity"], rel=1e-6)
    other = write_chats(tmp_path / "other.jsonl", rows=80)
    figures = lk.evaluate(chat_run, data=str(other))
    assert figures["dataset"] == str(other)
    assert figures["perplexity"] != pytest.approx(summary["test_perplexity"], rel=1e-6)
    with pytest.raises(ConfigError, match="split"):
        lk.evaluate(chat_run, split="train")


# ---------------------------------------------------------------- merge
def test_the_merged_llama_loads_in_transformers_and_generates_as_base_plus_adapter(
    chat_run, tmp_path
):
    adapter = json.loads((chat_run / "adapter" / "adapter_config.json").read_text())
    # all-linear resolved: every projection of every layer, the head left alone
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == LORA_TARGETS
    merged_dir = merge(chat_run, tmp_path / "merged")
    assert json.loads((merged_dir / "merge.json").read_text())["chat_template"] is True
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert merged.config.tie_word_embeddings
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted, _ = load_generator(chat_run)
    for prompt in PROMPTS:
        ids = rendered_ids(tokenizer, prompt)
        expected = greedy_text(adapted, tokenizer, ids)
        assert greedy_text(merged, tokenizer, ids) == expected
        assert lk.generate(merged_dir, prompt, max_new_tokens=12, temperature=0) == expected
