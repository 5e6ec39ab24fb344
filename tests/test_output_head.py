"""The output head run where it is needed: the loss on labeled positions only, contiguous head
inputs, answer scoring at the last position, greedy continuations, and bf16 inference that gives
the exact weights back. The model's own computation is the oracle throughout."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorakit.models.causal_lm import ChoiceScorer, greedy_continuations, left_padded
from lorakit.nn.frozen_base import bf16_inference
from lorakit.nn.output_head import contiguous_head_inputs, labeled_positions_loss, output_head
from tiny_models import tiny_gpt2

IGNORE = -100


def tiny_llama(vocab_size: int = 97) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def padded_batch(vocab_size: int = 97) -> dict[str, torch.Tensor]:
    """Three right-padded rows of 3 to 12 tokens; the first tokens of each row are a prompt
    (-100), the rest its response."""
    generator = torch.Generator().manual_seed(1)
    lengths, prompts = [12, 7, 3], [5, 4, 1]
    ids = torch.randint(1, vocab_size, (3, 12), generator=generator)
    mask = (torch.arange(12) < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, IGNORE)
    for row, prompt in enumerate(prompts):
        labels[row, :prompt] = IGNORE
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", sorted(MODELS))
def test_labeled_positions_loss_is_the_models_own_loss_with_the_same_gradients(name):
    model = MODELS[name]()
    batch = padded_batch()
    expected = model(**batch).loss
    expected.backward()
    expected_grads = gradients(model)
    loss = labeled_positions_loss(model, batch)
    loss.backward()
    assert torch.allclose(loss, expected, atol=1e-6), (loss, expected)
    grads = gradients(model)
    assert grads.keys() == expected_grads.keys() and grads
    for key, grad in grads.items():
        assert torch.allclose(grad, expected_grads[key], atol=1e-6), key
    assert not output_head(model)._forward_pre_hooks  # the hook is gone


def frozen_head_model(name: str):
    """The model with its output head (and the embedding tied to it) frozen, as under LoRA."""
    model = MODELS[name]()
    output_head(model).weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_frozen_head_takes_the_fused_loss_with_the_models_loss_and_gradients(name, monkeypatch):
    import lorakit.nn.output_head as head_module

    monkeypatch.setattr(head_module, "LOSS_CHUNK", 4)  # several chunks, the last one short
    calls = []
    fused = head_module.FrozenHeadCrossEntropy.apply
    monkeypatch.setattr(head_module.FrozenHeadCrossEntropy, "apply",
                        lambda *args: calls.append(1) or fused(*args))  # fmt: skip
    model, batch = frozen_head_model(name), padded_batch()
    expected = model(**batch).loss
    expected.backward()
    expected_grads = gradients(model)
    loss = labeled_positions_loss(model, batch)
    loss.backward()
    assert calls == [1]
    assert torch.allclose(loss, expected, atol=1e-6), (loss, expected)
    grads = gradients(model)
    assert grads.keys() == expected_grads.keys() and grads
    for key, grad in grads.items():
        assert torch.allclose(grad, expected_grads[key], atol=1e-6), key
    assert not output_head(model)._forward_pre_hooks


def test_the_fused_loss_under_bf16_autocast_is_the_models_within_bf16_rounding():
    model, batch = frozen_head_model("llama"), padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**batch).loss
        loss = labeled_positions_loss(model, batch)
    assert torch.allclose(loss, expected, rtol=2e-2), (loss, expected)


def test_logits_that_are_more_than_the_heads_product_keep_the_models_head(monkeypatch):
    """A model that caps or scales its logits (Gemma 2's softcapping) is not fused."""
    import lorakit.nn.output_head as head_module

    monkeypatch.setattr(head_module.FrozenHeadCrossEntropy, "apply",
                        lambda *args: pytest.fail("fused a capped head"))  # fmt: skip
    model, batch = frozen_head_model("llama"), padded_batch()
    model.config.final_logit_softcapping = 30.0
    expected = model(**batch).loss
    assert torch.allclose(labeled_positions_loss(model, batch), expected, atol=1e-6)


def test_labeled_positions_loss_sums_and_refuses_a_batch_without_targets():
    model, batch = tiny_llama(), padded_batch()
    targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    total = labeled_positions_loss(model, batch, reduction="sum")
    assert torch.allclose(total / targets, model(**batch).loss, atol=1e-6)
    empty = {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}
    with pytest.raises(ValueError, match="no target tokens"):
        labeled_positions_loss(model, empty)
    assert not output_head(model)._forward_pre_hooks


@pytest.mark.parametrize("name", sorted(MODELS))
def test_contiguous_head_inputs_change_no_logit(name):
    model = MODELS[name]()
    batch = padded_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        last = model(**inputs, logits_to_keep=1).logits
        every = model(**inputs).logits
        with contiguous_head_inputs(model):
            assert torch.allclose(model(**inputs, logits_to_keep=1).logits, last, atol=1e-6)
            assert torch.allclose(model(**inputs).logits, every, atol=1e-6)
    assert torch.allclose(last[:, 0], every[:, -1], atol=1e-5)
    assert not output_head(model)._forward_pre_hooks


def test_left_padded_rows_end_together_with_positions_from_their_first_token():
    batch = left_padded([[5, 6, 7], [8]], pad=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


# ---------------------------------------------------------------- on SmolLM2's tokenizer
@pytest.fixture(scope="module")
def llama_chat(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


PROMPTS = [
    "A gorgeous, witty film.",
    "Dull.",
    "The plot never comes together, and the actors know it.",
]


def direct_scores(model, tokenizer, prompts, choices, start) -> torch.Tensor:
    """log P(choice | start + prompt) summed over the choice's tokens, one unpadded row at a
    time."""
    rows = []
    for prompt in prompts:
        prompt_ids = [*start, *tokenizer.encode(prompt, add_special_tokens=False)]
        row = []
        for choice in choices:
            choice_ids = tokenizer.encode(choice, add_special_tokens=False)
            ids = torch.tensor([prompt_ids + choice_ids])
            with torch.no_grad():
                log_probs = model(ids).logits[0].double().log_softmax(-1)
            at = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(choice_ids))
            row.append(
                sum(float(log_probs[t, token]) for t, token in zip(at, choice_ids, strict=True))
            )
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("start", [None, []], ids=["eos-start", "chat"])
def test_choice_scorer_single_token_path_is_the_direct_log_likelihood(llama_chat, start):
    model, tokenizer = llama_chat
    choices = ["yes", "no"]
    assert all(len(tokenizer.encode(c, add_special_tokens=False)) == 1 for c in choices)
    scores = ChoiceScorer(tokenizer, PROMPTS, choices, 512, batch_size=2, start=start)(model)
    expected_start = [tokenizer.eos_token_id] if start is None else start
    expected = direct_scores(model, tokenizer, PROMPTS, choices, expected_start)
    assert torch.allclose(scores, expected, atol=1e-4), (scores, expected)


def test_choice_scorer_single_token_path_equals_the_per_choice_path(llama_chat):
    """A two-token choice sends every choice through one forward pass each."""
    model, tokenizer = llama_chat
    fast = ChoiceScorer(tokenizer, PROMPTS, ["yes", "no"], 512, start=[])(model)
    choices = ["yes", "no", "rotten"]
    assert len(tokenizer.encode("rotten", add_special_tokens=False)) == 2
    slow = ChoiceScorer(tokenizer, PROMPTS, choices, 512, start=[])(model)
    assert torch.allclose(slow[:, :2], fast, atol=1e-5)
    expected = direct_scores(model, tokenizer, PROMPTS, choices[2:], [])
    assert torch.allclose(slow[:, 2:], expected, atol=1e-4)


def test_greedy_continuations_batched_equal_one_by_one_and_stop(llama_chat):
    model, tokenizer = llama_chat
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    pad = tokenizer.pad_token_id
    batched = greedy_continuations(model, prompt_ids, 6, [pad], pad, batch_size=3)
    alone = [greedy_continuations(model, [ids], 6, [pad], pad) for ids in prompt_ids]
    assert batched.tokens == [one.tokens[0] for one in alone]
    assert batched.ended == [one.ended[0] for one in alone]
    with torch.no_grad():
        plain = model.generate(torch.tensor([prompt_ids[0]]), max_new_tokens=6, do_sample=False,
                               pad_token_id=pad, eos_token_id=[pad])[0, len(prompt_ids[0]) :]  # fmt: skip
    tokens = alone[0].tokens[0]
    assert tokens == [t for t in plain.tolist() if t != pad][: len(tokens)]
    # the first new token as a stop token: nothing before it, and the stop is reported
    first = (tokens or plain.tolist())[0]
    stopped = greedy_continuations(model, prompt_ids[:1], 6, [first], pad)
    assert (stopped.tokens, stopped.ended) == ([[]], [True])


def test_greedy_continuations_watch_the_first_tokens_log_probabilities(llama_chat):
    """The watched tokens' first-step log-probabilities are those of one forward pass."""
    model, tokenizer = llama_chat
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    pad, watch = tokenizer.pad_token_id, [17728, 16185]
    out = greedy_continuations(model, prompt_ids, 2, [pad], pad, batch_size=2, watch=watch)
    with torch.no_grad():
        for row, ids in enumerate(prompt_ids):
            direct = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)[watch]
            assert torch.allclose(out.first_log_probs[row].float(), direct, atol=1e-4)


# ---------------------------------------------------------------- bf16 inference
def test_bf16_inference_runs_in_bf16_and_restores_weights_and_requires_grad_exactly():
    model = tiny_llama()
    for name, param in model.named_parameters():
        param.requires_grad_("layers.1" in name)
    before = {
        n: (p.detach().clone(), p.dtype, p.requires_grad) for n, p in model.named_parameters()
    }
    kernel = model.config._attn_implementation
    batch = padded_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with bf16_inference(model):
        assert not torch.is_grad_enabled()
        assert not any(p.requires_grad for p in model.parameters())
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert model(**inputs).logits.dtype == torch.bfloat16
    for name, param in model.named_parameters():
        data, dtype, trains = before[name]
        assert param.dtype == dtype and param.requires_grad == trains, name
        assert torch.equal(param.detach(), data), name
    assert model.config._attn_implementation == kernel
    with pytest.raises(RuntimeError, match="inside"), bf16_inference(model):
        raise RuntimeError("inside")
    assert all(p.requires_grad == before[n][2] for n, p in model.named_parameters())
    assert all(torch.equal(p.detach(), before[n][0]) for n, p in model.named_parameters())


def test_bf16_inference_disabled_only_turns_gradients_off():
    model = tiny_llama()
    with bf16_inference(model, enabled=False):
        assert not torch.is_grad_enabled()
        assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
