"""`lorakit inspect` on MiniLM, a classic base and adapter folders."""

import pytest
import torch
from torch import nn

from lorakit import lora
from lorakit.config import ConfigError
from lorakit.inspect import condense_names, describe_adapter, describe_model, inspect


def test_condense_names_collapses_layer_numbers():
    names = [f"encoder.layer.{i}.attention.self.query" for i in range(6)] + ["pooler.dense"]
    assert condense_names(names) == [
        ("encoder.layer.{0-5}.attention.self.query", names[:6]),
        ("pooler.dense", ["pooler.dense"]),
    ]
    assert condense_names(["h.0.mlp", "h.2.mlp"])[0][0] == "h.{0,2}.mlp"


def test_inspect_minilm_lists_targets_and_counts():
    text = inspect("minilm")
    assert "encoder.layer.{0-5}.attention.self.query" in text
    assert "Linear(384->384)" in text and "x6" in text
    targets = next(line for line in text.splitlines() if line.strip().startswith("Linear "))
    for name in ("query (x6)", "key (x6)", "value (x6)", "dense (x19)"):
        assert name in targets
    assert "word_embeddings" in text
    total = int(text.split("model: BertModel, ")[1].split(" parameters")[0].replace(",", ""))
    assert 22_600_000 < total < 22_800_000
    assert all(line == line.rstrip() for line in text.splitlines())  # clean in a log


def test_inspect_smollm2_reads_the_converted_gguf():
    text = inspect("smollm2")
    assert "model: LlamaForCausalLM, 134,515,008 parameters" in text
    assert "model.layers.{0-29}.self_attn.q_proj" in text
    for name in ("q_proj (x30)", "gate_proj (x30)", "down_proj (x30)"):
        assert name in text


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        x = self.embedding(ids).mean(1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_describe_model_counts_match_torch():
    model = Tiny()
    info = describe_model(model)
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert info["top_level"]["blocks"] == 3 * (8 * 8 + 8)
    blocks = {"name": "blocks.{0-2}", "layer": "Linear(8->8)", "count": 3, "params": 216}
    assert blocks in info["tree"]
    assert info["targetable"] == {
        "Embedding": {"embedding": 1},
        "Linear": {"0": 1, "1": 1, "2": 1, "head": 1},
    }


def test_inspect_adapter_folder_shows_config_and_fingerprint(tmp_path):
    torch.manual_seed(0)
    model = lora.inject(Tiny(), lora.LoraConfig(r=3, lora_alpha=6, target_modules=["blocks.1", "head"],
                                                 modules_to_save=["embedding"]))  # fmt: skip
    fingerprint = lora.base_fingerprint(model)
    lora.save_adapter(
        model, tmp_path / "adapter", base_model_name_or_path="org/tiny-test",
        base_model_path="/models/tiny-test",
    )  # fmt: skip
    info = describe_adapter(tmp_path / "adapter")
    assert info["base_model"] == "org/tiny-test" and info["base_model_path"] == "/models/tiny-test"
    assert info["r"] == 3 and info["scaling"] == 2.0
    assert info["base_fingerprint"] == fingerprint
    assert info["lora_modules"] == ["blocks.1", "head"]
    assert info["lora_params"] == 3 * (8 + 8) + 3 * (8 + 2)
    assert info["saved_module_params"] == 50 * 8
    assert info["tensors"] == 5
    text = inspect(tmp_path / "adapter")
    assert fingerprint in text and "org/tiny-test" in text and "/models/tiny-test" in text
    assert "r " in text and " 3" in text


def test_inspect_rejects_a_folder_it_cannot_read(tmp_path):
    with pytest.raises(ConfigError, match="adapter folder"):
        inspect(tmp_path)
