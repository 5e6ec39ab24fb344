import pytest

from tiny_models import save_tiny_bert


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BERT with MiniLM's real tokenizer, saved as an ordinary model folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
