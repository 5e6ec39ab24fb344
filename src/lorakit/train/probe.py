"""A linear probe: how much of another task a classifier's encoder still carries.

Fine-tuning a classifier on one task moves its encoder; what it forgets of others shows in
what a fixed linear read-out of the encoder's features can still tell apart. The probe is
fitted once, on the base model's features for the other task, and then read on the features
of each trained model: the drop from the base's accuracy is what training took away.

    probe = LinearProbe.fit(*head_inputs(base, other["train"]), classes)
    probe.accuracy(*head_inputs(tuned, other["test"]))

The features are what the model's classification head takes in (for BERT-like models the
pooled first token), caught by a hook, so the probe reads any model with a ``classifier`` or
``score`` head.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_NAMES = ("classifier", "score")  # BERT-like heads, and Llama/GPT-2 classifiers
PROBE_STEPS = 200  # L-BFGS iterations: full-batch logistic regression converges well before
PROBE_WEIGHT_DECAY = 1e-3


def classification_head(model: nn.Module) -> nn.Module:
    """The model's classification head (a PEFT-style ``modules_to_save`` wrapper included)."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None) or getattr(getattr(model, "base_model", None), name, None)
        if head is not None:
            return head
    raise ValueError(f"{type(model).__name__} has no classification head ({', '.join(HEAD_NAMES)})")


@torch.no_grad()
def head_inputs(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every batch of ``loader``: what the head takes in, in fp32."""
    caught: list[torch.Tensor] = []
    hook = classification_head(model).register_forward_hook(
        lambda _module, inputs, _output: caught.append(inputs[0].detach().float())
    )
    labels = []
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            model(**{k: v for k, v in batch.items() if k != "labels"})
            labels.append(batch["labels"])
    finally:
        hook.remove()
        model.train(was_training)
    features = torch.cat(caught)
    return features.reshape(len(features), -1), torch.cat(labels)


class LinearProbe:
    """Logistic regression on standardised features (full-batch L-BFGS, seeded)."""

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, scale: torch.Tensor):
        self.linear, self.mean, self.scale = linear, mean, scale

    @classmethod
    def fit(
        cls, features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int = 0
    ) -> LinearProbe:
        torch.manual_seed(seed)
        mean, scale = features.mean(0), features.std(0).clamp_min(1e-6)
        x = (features - mean) / scale
        linear = nn.Linear(x.shape[1], classes)
        optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=PROBE_STEPS,
                                      line_search_fn="strong_wolfe")  # fmt: skip

        def loss():
            optimizer.zero_grad()
            value = nn.functional.cross_entropy(linear(x), labels)
            value = value + PROBE_WEIGHT_DECAY * linear.weight.square().sum()
            value.backward()
            return value

        optimizer.step(loss)
        return cls(linear, mean, scale)

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        predictions = self.linear((features - self.mean) / self.scale).argmax(1)
        return float((predictions == labels).double().mean())
