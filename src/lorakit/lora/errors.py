"""Errors raised by the LoRA engine. Each message says what was wrong and how to fix it."""


class LoraError(ValueError):
    """Base class: bad LoRA configuration, targets, adapter files or shapes."""


class TargetModulesError(LoraError):
    """`target_modules` (or `modules_to_save`) matched nothing in the model."""


class AdapterFileError(LoraError):
    """An adapter folder is missing, incomplete or corrupted."""


class AdapterShapeError(LoraError):
    """An adapter's tensors do not fit the model they are loaded into."""


class LoraConfigError(LoraError):
    """A `LoraConfig` field holds a value the engine cannot use; `key` names the field."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key

    def __reduce__(self):  # pickled (e.g. from a worker process) with both arguments
        return type(self), (self.key, str(self))
