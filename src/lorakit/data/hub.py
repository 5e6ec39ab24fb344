"""Hub datasets (`imdb`, `ag_news`, `rotten_tomatoes`) through `datasets.load_dataset`.

They need a network. Without one the loader fails at once (no retries) with a message that names
the offline datasets and file formats instead.
"""

from __future__ import annotations

from datasets import ClassLabel, DatasetDict, Features, Value

from lorakit.data.builtin import SENTIMENT_NAMES
from lorakit.data.errors import DataError, HubOfflineError
from lorakit.data.formats import AG_NEWS_NAMES
from lorakit.data.records import CARVE_FRACTION
from lorakit.data.splits import carve_validation
from lorakit.network import hub_reachable

# name -> (hub id, label names in the hub's label order)
HUB_DATASETS = {
    "imdb": ("stanfordnlp/imdb", SENTIMENT_NAMES),
    "ag_news": ("fancyzhx/ag_news", AG_NEWS_NAMES),
    "rotten_tomatoes": ("cornell-movie-review-data/rotten_tomatoes", SENTIMENT_NAMES),
}
OFFLINE_CHOICES = (
    "Offline, use a built-in dataset (rotten-tomatoes, bbc-news) or a local file: a .csv, .jsonl "
    "or .parquet with text and label columns, an aclImdb folder, or an AG News CSV."
)


def load_hub(name: str, validation_fraction: float | None = None) -> DatasetDict:
    """A hub dataset as train / validation / test with `text` and `label` (ClassLabel)."""
    hub_id, names = HUB_DATASETS[name]
    if not hub_reachable():
        raise HubOfflineError(
            f"The dataset {name!r} comes from the Hugging Face Hub ({hub_id}), and there is no "
            f"network (or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set). {OFFLINE_CHOICES}"
        )
    import datasets

    try:
        loaded = datasets.load_dataset(hub_id)
    except Exception as error:  # network and hub errors come in many types
        raise DataError(
            f"Could not load {hub_id} from the hub: {error}. {OFFLINE_CHOICES}"
        ) from None
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    parts = {
        split: loaded[split].select_columns(["text", "label"]).cast(features)
        for split in ("train", "validation", "test")
        if split in loaded
    }
    if "validation" not in parts:
        fraction = CARVE_FRACTION if validation_fraction is None else validation_fraction
        train = parts["train"]
        carved = [carve_validation(text, fraction) for text in train["text"]]
        for split in ("train", "validation"):
            parts[split] = train.select([i for i, s in enumerate(carved) if s == split])
    return DatasetDict({split: parts[split] for split in ("train", "validation", "test")})
