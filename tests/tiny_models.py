"""Small real models the tests build: a 2-layer BERT with MiniLM's real tokenizer."""

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from lorakit.models.transformer import minilm_path


def save_tiny_bert(folder: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A 2-layer BERT (dropout 0.1) saved as an ordinary model folder, with a tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
