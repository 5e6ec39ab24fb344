"""`lorakit export RUN_DIR OUT --format gguf|gguf-merged`: a causal-LM run for llama.cpp.

    --format gguf          OUT is the adapter as a LoRA GGUF (general.type = adapter), which
                           llama.cpp loads beside the base model's own GGUF:
                               llama-cli -m BASE.gguf --lora OUT
    --format gguf-merged   OUT is the merged model as one GGUF file: llama-cli -m OUT

The layout is the one llama.cpp's converters write (`convert_lora_to_gguf.py` and
`convert_hf_to_gguf.py`'s LlamaModel), through the `gguf` package:

    model.layers.3.self_attn.q_proj  ──TensorNameMap──►  blk.3.attn_q.weight
    lora_A (r × in)                                       blk.3.attn_q.weight.lora_a
    lora_B (out × r)                                      blk.3.attn_q.weight.lora_b
    adapter_config.json lora_alpha                        adapter.lora.alpha (float32)

Rotary embeddings: transformers' Llama rotates the two halves of each head, llama.cpp adjacent
pairs, so the converter permutes the rows of q_proj and k_proj (`rope_rows`). B·A changes W's
rows, so a LoRA's B gets the same row permutation and A none.

Scaling: llama.cpp multiplies B·A by alpha / r, reading r from each B: lorakit's own scaling
for a plain adapter (rank_pattern included). rsLoRA (alpha / sqrt(r)) and alpha_pattern have
no such form: each module's scaling is folded into its B and alpha is written as 0, which
llama.cpp reads as a scale of 1.

Only LoRA on linear layers travels in a LoRA GGUF (llama.cpp's adapters hold nothing else): a
run that also trained whole modules (`modules_to_save`), biases or embeddings exports merged.
The merged file carries the tokenizer: the base's own GGUF tokenizer when the base was
converted from one (`lorakit.models.gguf`: SmolLM2's), else one built from the folder's
byte-level BPE `tokenizer.json` (llama.cpp's default pre-tokenizer then splits text).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit import lora
from lorakit.config import ConfigError, load_config
from lorakit.rundir import read_run_summary

FORMATS = ("gguf", "gguf-merged")
DEFAULT_OUTTYPE = {"gguf": "f32", "gguf-merged": "f16"}  # as llama.cpp's two converters
ARCHITECTURE = "llama"  # the one architecture mapped (model_type in config.json)


class ExportError(ConfigError):
    """A run that cannot be exported in the format asked for."""


OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # what gguf quantizes


def _quant_types() -> dict[str, Any]:
    from gguf import GGMLQuantizationType

    return {name: GGMLQuantizationType[name.upper()] for name in OUTTYPES}


# ---------------------------------------------------------------- the run
def _read_run(run_dir: Path, format: str) -> tuple[dict[str, Any], Path, Any]:
    """The run's summary, its base model folder and that folder's transformers config."""
    from transformers import AutoConfig

    for name in ("config.toml", "summary.json", "adapter/" + lora.CONFIG_NAME):
        if not (run_dir / name).is_file():
            raise ExportError(
                f"{run_dir} is not a finished run directory (no {name}); give the folder "
                "`lorakit train` wrote, e.g. runs/instruct-20250101-120000"
            )
    summary = read_run_summary(run_dir)
    if summary.get("task") != "causal-lm":
        raise ExportError(
            f"{run_dir} is a {summary.get('recipe')} classification run; --format {format} "
            "exports causal-LM runs (recipes causal-lm, instruct, summarize): use `lorakit "
            "merge` for a classifier"
        )
    base = Path(summary.get("base_model_path") or load_config(run_dir / "config.toml").model.name)
    if not (base / "config.json").is_file():
        raise ExportError(
            f"the run's base model folder {base} is gone; convert or download it again (train "
            "once with the same model.name) and export again"
        )
    config = AutoConfig.from_pretrained(base)
    if config.model_type != ARCHITECTURE:
        raise ExportError(
            f"the run's base model is a {config.model_type} model; --format {format} maps "
            f"{ARCHITECTURE} models (SmolLM2, Llama) only: use `lorakit merge` for a "
            "transformers folder"
        )
    return summary, base, config


def _checked_out(out: Path, force: bool) -> Path:
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give a file name for the GGUF file, e.g. out.gguf")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; choose another file, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _checked_outtype(outtype: str | None, format: str) -> str:
    outtype = outtype or DEFAULT_OUTTYPE[format]
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    return outtype


# ---------------------------------------------------------------- names and rows
def tensor_names(config) -> Any:
    """gguf's map from transformers' Llama tensor names to llama.cpp's."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def gguf_name(names, hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`."""
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(f"{hf_name} has no llama.cpp name; export only a Llama model's tensors")
    return name


def heads_of(config, hf_name: str) -> int | None:
    """The heads whose rows `rope_rows` regroups: q_proj's, k_proj's (its own, fewer with
    grouped-query attention); None for every other tensor."""
    if ".q_proj." in hf_name:
        return config.num_attention_heads
    if ".k_proj." in hf_name:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def rope_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows from (first half, second half) to interleaved pairs, as llama.cpp's
    rotary embedding reads them (the converter's `LlamaModel.permute`)."""
    head_dim = rows.shape[0] // heads
    split = rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:])  # (heads, half, pair, ...)
    return split.swapaxes(1, 2).reshape(rows.shape)


def _encoded(array: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """``array`` in ``outtype`` and its GGML type. Vectors stay f32 and a row that is not a
    whole number of blocks falls back to f16, as llama.cpp's converter does."""
    import gguf

    qtype = _quant_types()[outtype]
    if array.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def _add_tensor(writer, name: str, tensor: torch.Tensor, outtype: str) -> None:
    data, qtype = _encoded(tensor.detach().float().contiguous().numpy(), outtype)
    writer.add_tensor(name, data, raw_dtype=qtype)


# ---------------------------------------------------------------- the LoRA GGUF
def lora_pairs(
    adapter_config: lora.LoraConfig, tensors: dict[str, torch.Tensor], config
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(llama.cpp weight name, A, B) of each LoRA layer of an adapter file's ``tensors``, B's
    rows permuted for q/k and scaled where `lora_alpha` cannot say it (module docstring)."""
    whole = [k for k in tensors if lora.lora_tensor_module(k) is None or "lora_embedding" in k]
    if whole:
        raise ExportError(
            f"the adapter also holds {whole[0].removeprefix('base_model.model.')} (a module "
            "trained whole, a bias or an embedding), which a llama.cpp LoRA cannot carry; "
            "export with --format gguf-merged"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():  # "<module>.lora_A.weight" -> pairs[module]["A"]
        pairs.setdefault(lora.lora_tensor_module(key), {})[key.rpartition(".lora_")[2][0]] = tensor
    names = tensor_names(config)
    fold = _folds_scaling(adapter_config)
    for module, pair in sorted(pairs.items()):
        a, b = pair["A"].float(), pair["B"].float()
        hf_name = f"{module}.weight"
        if fold:
            b = b * adapter_config.for_module(module).scaling
        heads = heads_of(config, hf_name)
        if heads:
            b = rope_rows(b, heads)
        yield gguf_name(names, hf_name), a, b


def _folds_scaling(config: lora.LoraConfig) -> bool:
    """Whether alpha / r of each B's own rank misses lorakit's scaling."""
    return bool(config.use_rslora or config.alpha_pattern or not config.lora_alpha)


def write_lora_gguf(adapter_dir: Path, config, out: Path, outtype: str = "f32") -> Path:
    """The adapter folder as a llama.cpp LoRA GGUF for the Llama model ``config`` describes."""
    import gguf

    adapter_config, tensors, _ = lora.read_adapter(adapter_dir)
    pairs = list(lora_pairs(adapter_config, tensors, config))  # refused before a file is made
    alpha = 0.0 if _folds_scaling(adapter_config) else float(adapter_config.lora_alpha)
    with _gguf_file(out) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, a, b in pairs:
            _add_tensor(writer, f"{name}.lora_a", a, outtype)
            _add_tensor(writer, f"{name}.lora_b", b, outtype)
    return out


# ---------------------------------------------------------------- the merged GGUF
def write_model_gguf(model, folder: Path, out: Path, outtype: str = "f16") -> Path:
    """A transformers Llama ``model`` (plain, or merged) as a standalone llama.cpp GGUF, with
    the tokenizer of the model folder ``folder``."""
    import gguf

    config = model.config
    names = tensor_names(config)
    with _gguf_file(out) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(str(getattr(config, "_name_or_path", "") or folder)).name)
        _add_hyperparameters(writer, config, outtype)
        _add_tokenizer(writer, folder, config.vocab_size)
        state = model.state_dict()
        for hf_name, tensor in state.items():
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # llama.cpp reads the embedding when output.weight is absent
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            heads = heads_of(config, hf_name)
            if heads:
                tensor = rope_rows(tensor, heads)
            _add_tensor(writer, gguf_name(names, hf_name), tensor, outtype)
    return out


def _add_hyperparameters(writer, config, outtype: str) -> None:
    import gguf

    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":  # transformers 5 keeps scaling here
        raise ExportError(
            f"the base model scales its rotary embedding ({rope.get('rope_type')}), which "
            "this export does not map; export with --format gguf beside llama.cpp's own base GGUF"
        )
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", config.num_attention_heads))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _file_type(outtype: str) -> int:
    import gguf

    return int(getattr(gguf.LlamaFileType, "ALL_F32" if outtype == "f32"
                       else f"MOSTLY_{outtype.upper()}"))  # fmt: skip


def _add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    """The base's own GGUF tokenizer, copied, when ``folder`` was converted from a GGUF file;
    else the folder's byte-level BPE tokenizer (gguf's BpeVocab and SpecialVocab)."""
    from lorakit.models.gguf import gguf_source

    source = gguf_source(folder)
    if source and Path(source["gguf_file"]).is_file():
        _copy_tokenizer(writer, Path(source["gguf_file"]))
        return
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError):
        raise ExportError(
            f"{folder} has no byte-level BPE tokenizer.json, the one kind of tokenizer this "
            "export writes; export with --format gguf beside llama.cpp's own base GGUF"
        ) from None
    tokens, types = [], []
    for text, _score, kind in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        types.append(kind)
    for i in range(len(tokens), vocab_size):  # rows of the embedding no token uses
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _copy_tokenizer(writer, path: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub)


# ---------------------------------------------------------------- writing
@contextmanager
def _gguf_file(out: Path) -> Iterator[Any]:
    """A GGUFWriter whose file appears at ``out`` complete, or not at all."""
    import gguf

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model file is meant to be shared
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------- export
@torch.no_grad()
def export(
    run_dir: str | Path,
    out: str | Path,
    format: str = "gguf",
    outtype: str | None = None,
    force: bool = False,
) -> Path:
    """Write the causal-LM run in ``run_dir`` as one GGUF file ``out`` for llama.cpp: its
    adapter (``gguf``, f32 by default) or the merged model (``gguf-merged``, f16 by default).
    Returns ``out``."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    outtype = _checked_outtype(outtype, format)
    summary, base, config = _read_run(run_dir, format)
    _checked_out(out, force)
    if format == "gguf":
        write_lora_gguf(run_dir / "adapter", config, out, outtype)
        source = _base_gguf(base)
        print(f"wrote the LoRA of {run_dir} to {out} ({outtype}); load it beside its base: "
              f"llama-cli -m {source} --lora {out}", flush=True)  # fmt: skip
        return out
    from lorakit.recipes import recipe_of_run

    model, _ = recipe_of_run(run_dir).load_adapted(run_dir, "lorakit")
    write_model_gguf(lora.merge_and_unload(model), base, out, outtype)
    print(f"wrote {run_dir} merged to {out} ({outtype}); run it alone: llama-cli -m {out}",
          flush=True)  # fmt: skip
    return out


def _base_gguf(base: Path) -> str:
    from lorakit.models.gguf import gguf_source

    source = gguf_source(base)
    if source:  # the file lorakit converted the base from
        return source["gguf_file"]
    return f"BASE.gguf (llama.cpp's convert_hf_to_gguf.py {base})"
