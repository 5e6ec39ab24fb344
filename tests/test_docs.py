"""The documentation points only at files inside the repository, and they exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MENTIONED = re.compile(r"`((?:\.\./|docs/|src/|tests/|benchmarks/)[^`\s]*\.(?:md|py|toml))`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documents_name_files_of_the_repository(doc):
    for name in MENTIONED.findall(doc.read_text(encoding="utf-8")):
        path = (doc.parent / name if name.startswith("..") else ROOT / name).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name} points outside the repository: {name}"
        assert path.exists(), f"{doc.name} names {name}, which does not exist"


def test_the_run_directory_contract_is_in_the_repository():
    contract = (ROOT / "docs" / "run-directory.md").read_text(encoding="utf-8")
    for name in ("config.toml", "summary.json", "metrics.jsonl", "adapter/", "lorakit eval"):
        assert name in contract


def test_the_license_is_an_spdx_expression_with_its_file():
    """setuptools >= 77 warns at every install about a `license = {text = ...}` table."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"
    assert all((ROOT / name).is_file() for name in project["license-files"])
