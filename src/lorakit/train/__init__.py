"""Training: the shared accelerate loop and the adapter engines behind one config."""

from lorakit.train.loop import TrainResult, make_accelerator, train_loop
from lorakit.train.metrics import evaluate

__all__ = ["TrainResult", "evaluate", "make_accelerator", "train_loop"]
