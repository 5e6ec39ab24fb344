"""Torch building blocks that the models and the training loops share: how a model drops out
and in what precision its frozen weights run.

- ``lorakit.nn.fast_dropout``: dropout masks from a cheap generator on the CPU, in every
  ``nn.Dropout`` and in transformers' attention (``fast_dropout(model)``).
- ``lorakit.nn.frozen_base``: the model's own dropout probability (``set_model_dropout``) and its
  frozen weights held in bf16 for a training run (``bf16_frozen_base``).

Like ``lorakit.lora``, this package imports nothing else from lorakit (torch, numpy and
transformers only), so any layer above may use it.
"""
