"""Data as `datasets.DatasetDict`: train / validation / test; `text`, `label` (or `prompt`, `response`).

```python
from lorakit.data import load_dataset, dataset_fingerprint, split_of
dsd = load_dataset("rotten-tomatoes")            # offline, built in; or "bbc-news"
dsd = load_dataset("reviews.csv", text_column="review", label_column="stars")
pairs = load_dataset("aclsum")                   # prompt / response: papers and their summaries
dataset_fingerprint(dsd)                          # recorded in the run directory
split_of("A text")                                # "train" | "validation" | "test"
```
"""

from lorakit.data.builtin import BUILTIN
from lorakit.data.errors import DataError, DataWarning, HubOfflineError
from lorakit.data.hub import HUB_DATASETS
from lorakit.data.load import ACCEPTED, load_dataset
from lorakit.data.splits import dataset_fingerprint, split_of
from lorakit.data.summaries import BUILTIN_PAIRS

BUILTIN_DATASETS = tuple(BUILTIN)
BUILTIN_PAIR_DATASETS = tuple(BUILTIN_PAIRS)

__all__ = [
    "ACCEPTED",
    "BUILTIN_DATASETS",
    "BUILTIN_PAIR_DATASETS",
    "HUB_DATASETS",
    "DataError",
    "DataWarning",
    "HubOfflineError",
    "dataset_fingerprint",
    "load_dataset",
    "split_of",
]
