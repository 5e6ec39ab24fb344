import pytest

from tiny_models import save_tiny_bert


@pytest.fixture(autouse=True, scope="session")
def lorakit_cache(tmp_path_factory):
    """Tokenized data and cached models go to a temporary folder, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_CACHE", str(tmp_path_factory.mktemp("lorakit-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BERT with MiniLM's real tokenizer, saved as an ordinary model folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
