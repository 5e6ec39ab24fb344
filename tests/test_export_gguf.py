"""`lorakit export --format gguf|gguf-merged`: a chat run on a tiny random Llama (SmolLM2's
tokenizer) written as llama.cpp's LoRA GGUF and as a merged GGUF, read back with gguf's reader,
transformers and, when it is installed, llama.cpp itself (llama-cpp-python)."""

import importlib.util
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit.api as lk
from lorakit import lora
from lorakit.cli import main
from lorakit.export import ExportError, export, write_lora_gguf, write_model_gguf
from lorakit.models.causal_lm import greedy_continuations
from lorakit.recipes import recipe_of_run

# transformers' module name -> llama.cpp's tensor name (convert_hf_to_gguf.py's LlamaModel)
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
IDS = [[1, 28, 1028, 314, 253, 1345, 30, 2], [17, 905, 4219, 43, 12, 808, 77, 5603]]


def write_chats(path, rows=60):
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            verdict = "fresh" if i % 2 else "rotten"
            messages = [{"role": "user", "content": f"Review {i}: fresh or rotten?"},
                        {"role": "assistant", "content": verdict}]  # fmt: skip
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_run(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export-run")
    overrides = [f"model.name={tiny_llama_dir}", f"data.path={write_chats(folder / 'chats.jsonl')}",
                 "data.max_length=48", "data.max_eval_samples=4", "train.max_steps=2",
                 "train.batch_size=8", "train.eval_batch_size=8", "train.bf16=false",
                 "train.checkpoint_every=0", "train.lr=0.05"]  # fmt: skip
    lk.train("instruct", out=folder / "run", overrides=overrides)
    return folder / "run"


@pytest.fixture(scope="module")
def lora_gguf(chat_run, tmp_path_factory):
    return export(chat_run, tmp_path_factory.mktemp("lora") / "adapter.gguf", format="gguf")


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows back to transformers' halves."""
    head_dim = rows.shape[0] // heads
    return rows.reshape(heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)


def field(reader, key):
    return reader.fields[key].contents()


# ---------------------------------------------------------------- the LoRA GGUF
def test_the_lora_gguf_has_the_converters_layout(chat_run, lora_gguf):
    reader = gguf.GGUFReader(lora_gguf)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == 16.0  # the instruct recipe's lora_alpha
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    config, tensors, _ = lora.read_adapter(chat_run / "adapter")
    expected = {}
    for key, tensor in tensors.items():
        module = lora.lora_tensor_module(key)  # model.layers.1.self_attn.q_proj
        block, kind = module.split(".")[2], ".".join(module.split(".")[3:])
        half = "a" if ".lora_A." in key else "b"
        expected[f"blk.{block}.{LLAMA_NAMES[kind]}.weight.lora_{half}"] = tensor.shape
    assert len(expected) == 2 * 2 * len(LLAMA_NAMES)  # every linear layer of both blocks
    found = {t.name: t for t in reader.tensors}
    assert set(found) == set(expected)
    for name, shape in expected.items():
        # GGUF lists dimensions innermost first: lora_a is (in, r), lora_b (r, out)
        assert list(found[name].shape) == list(reversed(shape)), name
        assert found[name].tensor_type == gguf.GGMLQuantizationType.F32


def test_unpermuting_q_and_k_gives_back_lorakits_tensors(chat_run, lora_gguf, tiny_llama_dir):
    heads = json.loads((tiny_llama_dir / "config.json").read_text())
    _, tensors, _ = lora.read_adapter(chat_run / "adapter")
    found = {t.name: np.array(t.data) for t in gguf.GGUFReader(lora_gguf).tensors}
    for block in (0, 1):
        for kind, gguf_kind in LLAMA_NAMES.items():
            key = f"base_model.model.model.layers.{block}.{kind}"
            a, b = found[f"blk.{block}.{gguf_kind}.weight.lora_a"], found[f"blk.{block}.{gguf_kind}.weight.lora_b"]  # fmt: skip
            if kind == "self_attn.q_proj":
                b = unpermute(b, heads["num_attention_heads"])
            elif kind == "self_attn.k_proj":
                b = unpermute(b, heads["num_key_value_heads"])
            else:  # only q and k are permuted: a permutation there would show here
                assert np.array_equal(b, tensors[f"{key}.lora_B.weight"].numpy())
            assert np.array_equal(a, tensors[f"{key}.lora_A.weight"].numpy())
            assert np.array_equal(b, tensors[f"{key}.lora_B.weight"].numpy())
    q_b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy()
    assert not np.array_equal(found["blk.0.attn_q.weight.lora_b"], q_b)  # it was permuted


def test_rslora_scaling_is_folded_into_b_with_alpha_zero(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = lora.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["v_proj"],
                             init_lora_weights=False)  # fmt: skip
    lora.save_adapter(lora.inject(model, config), tmp_path / "adapter")
    out = write_lora_gguf(tmp_path / "adapter", model.config, tmp_path / "rs.gguf")
    reader = gguf.GGUFReader(out)
    assert field(reader, "adapter.lora.alpha") == 0.0  # llama.cpp: scale 1, B carries it
    b = {t.name: np.array(t.data) for t in reader.tensors}["blk.0.attn_v.weight.lora_b"]
    stored = model.model.layers[0].self_attn.v_proj.lora_B["default"].weight.detach().numpy()
    np.testing.assert_allclose(b, stored * 8 / 2, rtol=1e-6)  # alpha / sqrt(r)


# ---------------------------------------------------------------- the merged GGUF
@pytest.mark.parametrize(("outtype", "tolerance"), [("f32", 1e-4), ("f16", 2e-2)])
def test_the_merged_gguf_gives_the_merged_models_logits_in_transformers(
    chat_run, tmp_path, outtype, tolerance
):
    out = export(chat_run, tmp_path / f"merged-{outtype}.gguf", format="gguf-merged",
                 outtype=outtype)  # fmt: skip
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.type") == "model"
    assert field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied to token_embd
    model, _ = recipe_of_run(chat_run).load_adapted(chat_run, "lorakit")
    merged = lora.merge_and_unload(model).eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        expected, got = merged(ids).logits, loaded(ids).logits
    assert float((expected - got).abs().max()) < tolerance


@pytest.mark.parametrize("outtype", ["q8_0", "q4_1", "bf16"])
def test_a_quantized_export_quantizes_the_matrices_and_keeps_vectors_f32(
    chat_run, tmp_path, outtype
):
    out = export(chat_run, tmp_path / "q.gguf", format="gguf-merged", outtype=outtype)
    reader = gguf.GGUFReader(out)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType[outtype.upper()]
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert field(reader, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{outtype.upper()}"]


# ---------------------------------------------------------------- the command and its errors
def test_the_command_writes_the_file_and_refuses_to_overwrite_it(chat_run, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["export", str(chat_run), str(out), "--format", "gguf"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["export", str(chat_run), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(chat_run), str(out), "--force", "--outtype", "f16"]) == 0


def one_line_error(*args, **kwargs) -> str:
    with pytest.raises(ExportError) as error:
        export(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_input_is_a_one_line_error_naming_the_fix(chat_run, tmp_path):
    assert "gguf, gguf-merged" in one_line_error(chat_run, tmp_path / "x.gguf", format="onnx")
    assert "q8_0" in one_line_error(chat_run, tmp_path / "x.gguf", outtype="q2_k")
    assert "finished run" in one_line_error(tmp_path, tmp_path / "x.gguf")
    fake = tmp_path / "classifier"
    shutil.copytree(chat_run, fake, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
    summary = json.loads((fake / "summary.json").read_text())
    (fake / "summary.json").write_text(json.dumps({**summary, "task": "classification",
                                                   "recipe": "sentiment"}))  # fmt: skip
    assert "lorakit merge" in one_line_error(fake, tmp_path / "x.gguf")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (fake / "summary.json").write_text(json.dumps({**summary, "base_model_path": str(gpt2)}))
    assert "llama models" in one_line_error(fake, tmp_path / "x.gguf", format="gguf-merged")


def test_a_run_that_trained_a_whole_module_exports_merged_only(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = lora.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    lora.save_adapter(lora.inject(model, config), tmp_path / "adapter")
    with pytest.raises(ExportError, match="gguf-merged"):
        write_lora_gguf(tmp_path / "adapter", model.config, tmp_path / "x.gguf")


# ---------------------------------------------------------------- llama.cpp itself
LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not LLAMA_CPP,
    reason="llama-cpp-python is not installed: benchmarks/llamacpp_agreement.py installs it "
    "(a source build, about 17 minutes on 2 cores)",
)


def llama_cpp_run(model_path, ids, new_tokens, lora_path=None) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits at each prompt position, and its greedy continuation."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=lora_path and str(lora_path), n_ctx=128,
                n_threads=1, logits_all=True, seed=0, verbose=False)  # fmt: skip
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        tokens.append(int(token))
        if len(tokens) == new_tokens:
            break
    llm.close()
    return logits, tokens


def with_random_lora(model, std: float):
    """``model`` with LoRA on every linear layer and a random B (a fresh adapter does nothing)."""
    torch.manual_seed(0)
    lora.inject(model, lora.LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_NAMES)))
    with torch.no_grad():
        for name, param in lora.adapter_parameters(model).items():
            if "lora_B" in name:
                param.normal_(std=std)
    return model.eval()


def lorakit_greedy(model, prompts, new_tokens) -> list[list[int]]:
    return greedy_continuations(model, prompts, new_tokens, stop_ids=(), pad=0).tokens


@needs_llama_cpp
def test_llama_cpp_computes_with_the_lora_gguf_and_the_merged_gguf_as_lorakit(
    tiny_llama_dir, tmp_path
):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    base_gguf = write_model_gguf(base, tiny_llama_dir, tmp_path / "base.gguf", "f32")
    model = with_random_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), std=0.5)
    lora.save_adapter(model, tmp_path / "adapter")
    lora_gguf = write_lora_gguf(tmp_path / "adapter", model.config, tmp_path / "lora.gguf")
    with torch.no_grad():
        expected_logits = [model(torch.tensor([ids])).logits[0].numpy() for ids in IDS]
    expected = lorakit_greedy(model, IDS, 8)
    assert expected != lorakit_greedy(base, IDS, 8)  # the adapter changes the answer
    merged_gguf = write_model_gguf(
        lora.merge_and_unload(model), tiny_llama_dir, tmp_path / "merged.gguf", "f32"
    )
    for path, lora_path in ((base_gguf, lora_gguf), (merged_gguf, None)):
        for ids, logits, tokens in zip(IDS, expected_logits, expected, strict=True):
            got_logits, got_tokens = llama_cpp_run(path, ids, 8, lora_path)
            # llama.cpp keeps its KV cache in f16: about 0.1% of the largest logit apart here,
            # where a LoRA GGUF without the q/k row permutation is about 100% apart
            np.testing.assert_allclose(got_logits, logits, atol=1e-2 * np.abs(logits).max())
            assert got_tokens == tokens, path.name


@needs_llama_cpp
def test_llama_cpp_on_smollm2s_own_q4_1_file_with_the_lora_gguf_predicts_as_lorakit(
    smollm2_folder, tmp_path
):
    from transformers import AutoTokenizer

    from lorakit.generate import prompt_ids
    from lorakit.models.gguf import smollm2_gguf

    model = with_random_lora(AutoModelForCausalLM.from_pretrained(smollm2_folder), std=0.04)
    lora.save_adapter(model, tmp_path / "adapter")
    lora_gguf = write_lora_gguf(tmp_path / "adapter", model.config, tmp_path / "lora.gguf")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    ids = prompt_ids(tokenizer, "Name three colours of the rainbow.", chat=True)
    expected = lorakit_greedy(model, [ids], 8)[0]
    with lora.disable_adapters(model):
        assert expected != lorakit_greedy(model, [ids], 8)[0]  # the adapter changes the answer
    with torch.no_grad():
        logits = model(torch.tensor([ids + expected])).logits[0, len(ids) - 1 :]
    # llama.cpp reads the prompt and lorakit's tokens and predicts each next one, with the 4-bit
    # file itself as the base (lorakit's base is its dequantized copy; llama.cpp also rounds the
    # activations to 8 bits): its pick is lorakit's, or a near tie for lorakit (0.25 logits)
    got = llama_cpp_run(smollm2_gguf(), ids + expected, 1, lora_gguf)[0][len(ids) - 1 :]
    picks = torch.from_numpy(got.argmax(-1))
    gaps = logits.max(-1).values - logits.gather(1, picks[:, None])[:, 0]
    assert (gaps <= 0.25).all(), gaps
    assert (picks == logits.argmax(-1)).float().mean() >= 0.75


def test_a_base_converted_from_a_gguf_file_gives_the_merged_file_its_tokenizer(
    tiny_llama_dir, tmp_path
):
    from lorakit.models.gguf import SOURCE_RECORD, smollm2_gguf

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "from-gguf")
    (folder / SOURCE_RECORD).write_text(json.dumps({"gguf_file": str(smollm2_gguf())}))
    model = AutoModelForCausalLM.from_pretrained(folder)
    out = write_model_gguf(model, folder, tmp_path / "model.gguf", "f16")
    source, written = gguf.GGUFReader(smollm2_gguf()), gguf.GGUFReader(out)
    keys = [k for k in source.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.merges" in keys and field(written, "tokenizer.ggml.pre") == "smollm"
    for key in keys:
        assert written.fields[key].types == source.fields[key].types, key
        assert field(written, key) == field(source, key), key
