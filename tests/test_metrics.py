"""The figures of lorakit.train.metrics that need no model: ROUGE."""

import pytest

from lorakit.train.metrics import rouge


def test_rouge_of_identical_texts_is_one_and_of_disjoint_texts_zero():
    assert rouge(["The cat sat on the mat."], ["The cat sat on the mat."]) == {
        "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0,
    }  # fmt: skip
    assert rouge(["dogs bark loudly"], ["the cat sat"]) == {
        "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0,
    }  # fmt: skip


def test_rouge_averages_the_f_measure_of_each_pair():
    # "the cat sat" against "the cat ran": unigrams 2 of 3 each way, bigrams 1 of 2, LCS 2 of 3
    scores = rouge(["the cat sat", "a dog"], ["the cat ran", "a dog"])
    assert scores == pytest.approx({"rouge1": (2 / 3 + 1) / 2, "rouge2": (1 / 2 + 1) / 2,
                                    "rougeL": (2 / 3 + 1) / 2})  # fmt: skip


def test_rouge_stems_and_ignores_case_and_punctuation():
    assert rouge(["Models improved."], ["the model improves"])["rouge1"] == pytest.approx(0.8)


def test_rouge_needs_one_reference_per_prediction():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        rouge([], [])
