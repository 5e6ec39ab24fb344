"""Small real models and data files the tests build.

Each model builder seeds torch's generator itself, so two calls give two identical models: tests
build one for lorakit and one for PEFT, or one to save and one to load into. Widths are 32,
depths 2, heads 4 throughout; the vocabulary and the head are what a test chooses.
"""

import random
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from lorakit.models.transformer import minilm_path

# Review words for synthetic CSV files: each class has words of its own, every row some filler.
FILLER = "the film story actors plot director scenes music pace ending".split()
POSITIVE = ["wonderful", "superb", "moving", "brilliant", "delightful", "funny"]
NEGATIVE = ["dull", "tedious", "clumsy", "boring", "lifeless", "awful"]
NEUTRAL = ["average", "passable", "middling", "ordinary", "uneven", "fine"]


def tiny_bert(
    vocab_size: int = 120,
    num_labels: int = 2,
    max_position_embeddings: int = 64,
    hidden: int = 32,
    seed: int = 0,
) -> BertForSequenceClassification:
    """A 2-layer BERT classifier (BERT's dropout 0.1), in eval mode."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=max_position_embeddings,
        num_labels=num_labels,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def save_tiny_bert(folder: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A 2-layer BERT saved as an ordinary model folder, with MiniLM's real tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = tiny_bert(len(tokenizer), max_position_embeddings=128, hidden=hidden, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_gpt2(vocab_size: int = 97, n_positions: int = 32, n_layer: int = 2) -> GPT2LMHeadModel:
    """A GPT-2 (Conv1D attention and MLP, output head tied to the token embedding), eval mode."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=n_layer, n_head=4
    )
    return GPT2LMHeadModel(config).eval()


def tiny_roberta():
    """RoBERTa's head is a module with layers of its own: classifier.dense, classifier.out_proj."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=80, num_labels=2,
    )  # fmt: skip
    return RobertaForSequenceClassification(config).eval()


def tiny_distilbert():
    """DistilBERT's head is `pre_classifier` then `classifier`."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return DistilBertForSequenceClassification(config).eval()


def tiny_gemma():
    """Gemma's token embedding multiplies its lookup by embed_scale (sqrt of the width)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    config = GemmaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    return GemmaForCausalLM(config).eval()


def tiny_llama():
    """A 2-layer random Llama causal LM (SmolLM2's architecture) without a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def write_reviews_csv(
    path: Path,
    classes: dict[str, list[str]],
    rows: int,
    columns: tuple[str, str] = ("review", "label"),
    filler_words: int = 4,
    shuffle: bool = False,
    seed: int = 0,
) -> Path:
    """A CSV of short synthetic reviews: row i has class i mod len(classes), `filler_words` filler
    words, two words of its class (in that order unless `shuffle`) and its number, so every text
    is unique."""
    rng = random.Random(seed)
    labels = list(classes)
    lines = [",".join(columns)]
    for i in range(rows):
        label = labels[i % len(labels)]
        words = rng.sample(FILLER, filler_words) + rng.sample(classes[label], 2)
        if shuffle:
            rng.shuffle(words)
        lines.append(f'"{" ".join(words)} {i}",{label}')
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_causal_lm(folder: Path, texts: list[str], vocab_size: int, width: int):
    """A randomly initialised 2-layer GPT-2 (2 heads, 128 positions) with a byte-level BPE
    tokenizer trained on `texts`, saved as an ordinary model folder. Returns (model, tokenizer)."""
    from lorakit.models.tiny_gpt2 import tiny_gpt2_config, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size, model_max_length=128)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer), 2, width, 2, 128)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def train_small_classic(root: Path) -> Path:
    """A finished `classic` run in ROOT/run: pretrained on a small 3-class file, transferred to
    a 2-class file of reviews (about ten seconds)."""
    from lorakit import api

    root.mkdir(parents=True, exist_ok=True)
    news = write_reviews_csv(root / "news.csv", {"a": POSITIVE, "b": NEGATIVE, "c": NEUTRAL},
                             rows=150, columns=("text", "label"))  # fmt: skip
    reviews = write_reviews_csv(root / "reviews.csv", {"good": POSITIVE, "bad": NEGATIVE},
                                rows=200, columns=("text", "label"))  # fmt: skip
    api.train("classic", out=root / "run", overrides=[
        f"pretrain.data={news}", f"data.path={reviews}", "pretrain.epochs=1", "train.epochs=2",
        "compare=false",
    ])  # fmt: skip
    return root / "run"


def save_tiny_llama_chat(folder: Path, tokenizer_folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama (SmolLM2's shape in miniature: grouped-query
    attention, tied embeddings) with SmolLM2's real tokenizer and chat template, saved as an
    ordinary model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
