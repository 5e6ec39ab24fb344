"""Regexes over module names, matched in bounded time.

PEFT reads four settings of an adapter's config as regular expressions over module names:

    target_modules, exclude_modules   a string must match the whole name
    rank_pattern, alpha_pattern       a key must match the end of the name, after a dot
    layers_pattern                    an entry must match the name part before a layer index

Adapter files come from anyone, and Python's `re` backtracks without bound and cannot be
interrupted: `"(.|..)*y."` against a 40-letter module name outlasts any server. So the engine
matches these with the `regex` package (`re`'s syntax; transformers' tokenizers use it too),
whose matching takes a timeout: one pass over a model's names (`MatchBudget`) may spend
`MATCH_SECONDS` in them, and a pattern that needs more is refused, the setting named.
"""

from __future__ import annotations

import time

import regex

from .errors import LoraConfigError

MATCH_SECONDS = 1.0  # for every pattern of one config against every name of one model


class MatchBudget:
    """The time left to one pass of matching a config's patterns against a model's names."""

    def __init__(self, seconds: float = MATCH_SECONDS):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def check_pattern(pattern: str, setting: str) -> None:
    """A `LoraConfigError` naming `setting` unless `pattern` is a regular expression."""
    try:
        regex.compile(pattern)
    except (regex.error, TypeError, ValueError):
        raise LoraConfigError(
            setting, f"{setting}: {pattern!r} is not a regular expression"
        ) from None


def fullmatch(pattern: str, name: str, setting: str, budget: MatchBudget | None = None) -> bool:
    """Does `pattern` match the whole of `name`? (PEFT's rule for a target_modules string.)"""
    return _run(regex.fullmatch, pattern, pattern, name, setting, budget) is not None


def matches_end(key: str, name: str, setting: str, budget: MatchBudget | None = None) -> bool:
    """Does `key` match the end of `name` after a dot? (PEFT's `get_pattern_key`.)"""
    return _run(regex.match, rf"(.*\.)?({key})$", key, name, setting, budget) is not None


def layer_index(pattern: str, name: str, setting: str, budget: MatchBudget | None = None):
    """The layer index that follows `pattern` and a dot in `name` (PEFT's
    `check_target_module_exists`), or None."""
    found = _run(
        regex.match, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", pattern, name, setting, budget
    )
    return None if found is None else int(found.group("idx"))


def _run(how, expression: str, shown: str, name: str, setting: str, budget: MatchBudget | None):
    budget = budget or MatchBudget()
    left = budget.left()
    try:
        if left <= 0:
            raise TimeoutError
        return how(expression, name, timeout=left)
    except TimeoutError:
        raise LoraConfigError(
            setting,
            f"{setting} {shown!r} takes too long to match module names (over "
            f"{budget.seconds:g} s): nested repeats such as '(a|aa)*' backtrack without end; "
            "write a simpler pattern or a list of names",
        ) from None
    except (regex.error, TypeError, ValueError):
        raise LoraConfigError(
            setting, f"{setting}: {shown!r} is not a regular expression"
        ) from None
