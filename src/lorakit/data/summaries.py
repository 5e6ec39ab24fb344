"""Papers and their written summaries as prompt/response pairs: ACLSum (`aclsum==0.1.2`, MIT).

ACLSum holds 250 ACL Anthology papers, split by its authors into train / val / test (100 / 50 /
100). Of each paper the package keeps the sentences of three sections, and experts wrote a
one-sentence summary of each of three aspects:

    sentences: abstract, introduction, conclusion  ->  prompt: the sections, then the instruction
    summary:   challenge, approach, outcome        ->  response: the three in that order

The three aspects joined read as a three-sentence summary of the paper; the package offers no
other summary. The sentences come tokenized as the package has them ("In this paper , we ..."),
joined by a space as the package's own `to_parallel_corpus` does, sections by a blank line. The
instruction closes the prompt, so a prompt cut from its start (`causal.instruction_dataset`)
keeps it.

In SmolLM2 tokens, all three sections make a long prompt (median 1,162, p90 1,694, max 3,380);
the abstract alone a short one (median 176, p90 260, max 1,371: one abstract lists Japanese
words). The summary: median 82, p90 94, max 107. The package's `ACLSum` class is not imported
(it needs `sienna`); its JSON-lines files are read directly, rows in file order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from datasets import Dataset, DatasetDict

from lorakit.data.builtin import package_folder
from lorakit.data.errors import DataError

SUMMARIZE_INSTRUCTION = (
    "Summarize this paper in three sentences: the challenge, the approach and the outcome."
)
SUMMARY_PROMPT = "{document}\n\n" + SUMMARIZE_INSTRUCTION + "\n"
ACLSUM_SECTIONS = ("abstract", "introduction", "conclusion")
ACLSUM_ASPECTS = ("challenge", "approach", "outcome")
_ACLSUM_FILES = {"train": "train", "validation": "val", "test": "test"}  # our split: its file
_ACLSUM_INSTALL = "pip install aclsum==0.1.2"


def summary_prompt(document: str) -> str:
    """The prompt that asks for a summary of `document`."""
    return SUMMARY_PROMPT.format(document=document)


def _paper_pair(paper: dict, sections: Sequence[str]) -> tuple[str, str]:
    document = "\n\n".join(" ".join(paper["sentences"][s]) for s in sections)
    summary = " ".join(paper["summary"][aspect].strip() for aspect in ACLSUM_ASPECTS)
    return summary_prompt(document), summary


def aclsum(sections: Sequence[str] = ACLSUM_SECTIONS) -> DatasetDict:
    """ACLSum's train / validation / test papers, columns `prompt` and `response`.

    `sections` picks which of the paper's sections make the document, in the order given.
    """
    unknown = [s for s in sections if s not in ACLSUM_SECTIONS]
    if unknown or not sections:
        raise DataError(
            f"aclsum sections {list(sections)} are not among {', '.join(ACLSUM_SECTIONS)}; "
            "pick one or more of those"
        )
    folder = package_folder("aclsum", f"{_ACLSUM_INSTALL}.") / "dataset"
    splits = {}
    for split, stem in _ACLSUM_FILES.items():
        path = folder / f"{stem}.jsonl"
        if not path.is_file():
            raise DataError(f"{path} is missing: reinstall with {_ACLSUM_INSTALL}.")
        lines = path.read_text(encoding="utf-8").splitlines()
        pairs = [_paper_pair(json.loads(line), sections) for line in lines if line.strip()]
        prompts, responses = zip(*pairs, strict=True)
        splits[split] = Dataset.from_dict({"prompt": list(prompts), "response": list(responses)})
    return DatasetDict(splits)


def aclsum_abstracts() -> DatasetDict:
    """ACLSum with each paper's abstract alone as the document: a prompt a small model on a CPU
    can afford (median 176 tokens against 1,162 for all three sections)."""
    return aclsum(sections=("abstract",))


BUILTIN_PAIRS = {"aclsum": aclsum, "aclsum-abstracts": aclsum_abstracts}
