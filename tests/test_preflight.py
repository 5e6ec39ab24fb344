"""The pre-flight checks of a causal-LM run, on a tiny Llama with SmolLM2's tokenizer."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit.lora as lora
from lorakit.data.causal import padded_rows
from lorakit.data.chat import chat_dataset, pair_conversations
from lorakit.train.preflight import preflight_checks


@pytest.fixture(scope="module")
def adapted(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = lora.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return lora.inject(model, config), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_checks_say_what_trains_and_what_the_labels_teach(adapted):
    model, tokenizer = adapted
    rows = chat_dataset(tokenizer, pair_conversations(["Hi", "Bye"], ["Hello.", "Goodbye."]), 64)
    chats = [(r["input_ids"][: int(r["attention_mask"].sum())].tolist(), r["labels"].tolist())
             for r in rows.dataset]  # fmt: skip
    ids = chats[0][0][:10]
    no_end = (ids, [-100] * 5 + ids[5:])  # a row whose labels miss <|im_end|>
    train = padded_rows([*((i, labels[: len(i)]) for i, labels in chats), no_end],
                        tokenizer.pad_token_id)  # fmt: skip
    checks = {c["check"]: c for c in preflight_checks(
        model, tokenizer, train, rows.end_of_turn, chat=True, truncated=3)}  # fmt: skip
    assert all("\n" not in c["line"] for c in checks.values())
    assert checks["target_modules"]["value"] == {"q_proj": 2, "v_proj": 2}
    assert checks["target_modules"]["line"] == "LoRA on 4 modules: q_proj x2, v_proj x2"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert checks["trainable_parameters"]["value"] == trainable > 0
    assert checks["adapter_bytes"]["value"] == 4 * trainable
    end = checks["end_of_turn_in_labels"]
    assert end["value"] == pytest.approx(2 / 3)
    assert end["line"].startswith("end-of-turn token '<|im_end|>' is a label in 66.7% of")
    assert "never teach the model to stop" in end["line"]
    columns = train.with_format("torch")[:]
    targets = int((columns["labels"][:, 1:] != -100).sum())
    real = int(columns["attention_mask"][:, 1:].sum())
    assert checks["loss_token_share"]["value"] == pytest.approx(targets / real)
    assert checks["truncated_examples"]["value"] == 3
    assert checks["pad_equals_eos"]["value"] is True


def test_no_truncation_line_when_nothing_was_cut(adapted):
    model, tokenizer = adapted
    rows = chat_dataset(tokenizer, pair_conversations(["Hi"], ["Hello."]), 64)
    checks = preflight_checks(model, tokenizer, rows.dataset, rows.end_of_turn, chat=True)
    names = [c["check"] for c in checks]
    assert "truncated_examples" not in names
    assert next(c for c in checks if c["check"] == "end_of_turn_in_labels")["value"] == 1.0
