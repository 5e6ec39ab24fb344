"""Models: the classic GloVe classifier (`lorakit.models.classic`) and transformers loaders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from lorakit.config import ConfigError


class ModelError(ConfigError):
    """A model folder that is missing or cannot be loaded; the message names the folder."""


def cache_root() -> Path:
    """Where lorakit caches the models it makes: `$LORAKIT_CACHE`, else `~/.cache/lorakit`."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own bars ("Loading weights") off: loading a model is not a step a user
    waits on or asked to see."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@contextmanager
def loading_folder(source: str | Path) -> Iterator[None]:
    """``from_pretrained``'s failures on a local folder (a damaged config.json or tokenizer, no
    or truncated weights, an unknown model type) as one ModelError naming the folder."""
    try:
        yield
    except (OSError, ValueError, SafetensorError) as error:
        if not Path(source).is_dir():
            raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
        raise ModelError(
            f"cannot load the model in {source}: {reason.rstrip('.')}. Give a complete model "
            "folder (save_pretrained's output: config.json, the weights and the tokenizer)"
        ) from None
