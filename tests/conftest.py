import pytest

from tiny_models import NEGATIVE, NEUTRAL, POSITIVE, save_tiny_bert, write_reviews_csv


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


@pytest.fixture(scope="session")
def verdicts_csv(tmp_path_factory):
    """160 reviews in columns `review` and `verdict`: two classes, "fresh" and "rotten"."""
    return write_reviews_csv(
        tmp_path_factory.mktemp("verdicts") / "reviews.csv",
        {"fresh": POSITIVE, "rotten": NEGATIVE},
        rows=160,
        columns=("review", "verdict"),
        seed=1,
    )


@pytest.fixture(scope="session")
def stars_csv(tmp_path_factory):
    """360 reviews in columns `review` and `stars`: three classes named by strings."""
    return write_reviews_csv(
        tmp_path_factory.mktemp("stars") / "my.csv",
        {"great": POSITIVE, "bad": NEGATIVE, "okay": NEUTRAL},
        rows=360,
        columns=("review", "stars"),
        filler_words=5,
        shuffle=True,
    )


@pytest.fixture(scope="session")
def smollm2_folder(lorakit_cache):
    """SmolLM2-135M-Instruct converted into the test run's lorakit cache (about 20 s), shared by
    every test that needs it."""
    from lorakit.models.gguf import converted_folder, smollm2_gguf

    return converted_folder(smollm2_gguf())


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_folder, tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template (a model folder)."""
    from tiny_models import save_tiny_llama_chat

    return save_tiny_llama_chat(tmp_path_factory.mktemp("tiny-llama"), smollm2_folder)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread, and much faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
