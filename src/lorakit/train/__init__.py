"""Training: the shared accelerate loop and the adapter engines behind one config."""

from lorakit.train.loop import TrainResult, evaluate, make_accelerator, train_loop

__all__ = ["TrainResult", "evaluate", "make_accelerator", "train_loop"]
