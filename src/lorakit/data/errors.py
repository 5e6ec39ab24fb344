"""Errors and warnings of the data layer. Each message names the file and the fix."""

from __future__ import annotations

import os
import sys
import warnings

from lorakit.network import OfflineError


class DataError(ValueError):
    """The data could not be loaded as asked: a missing file, a bad column, too few classes..."""


class HubOfflineError(DataError, OfflineError):
    """A hub dataset was asked for and the hub cannot be reached (both a DataError and an
    OfflineError, so either `except` catches it)."""


class DataWarning(UserWarning):
    """Data was changed while loading (rows dropped, bytes replaced); the message counts them."""


def warn(message: str) -> None:
    """Issue a DataWarning attributed to the first caller outside `lorakit.data`."""
    package = os.path.dirname(os.path.abspath(__file__))
    level, frame = 1, sys._getframe(0)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, DataWarning, stacklevel=level)


def first_few(values: list, shown: int = 5) -> str:
    """`values` for a message: all of them, or the first few and how many more."""
    if len(values) > shown:
        return f"{values[:shown]} and {len(values) - shown} more"
    return str(values)
