"""Exceptions resinspect raises for bad user input, with messages that say what to do."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ResinspectError",
    "UnknownNameError",
    "CheckpointError",
    "DataError",
    "TrainingDiverged",
    "OptionError",
    "OutputError",
]


def closest_match(value: str, valid: Iterable[str]) -> str | None:
    """The most similar valid name (ties go to the longest common prefix), or None."""

    def score(candidate: str) -> tuple[float, int]:
        ratio = difflib.SequenceMatcher(None, value, candidate).ratio()
        prefix = len(os.path.commonprefix([value, candidate]))
        return ratio, prefix

    scored = [(score(c), c) for c in valid]
    scored = [item for item in scored if item[0][0] >= 0.5]
    return max(scored)[1] if scored else None


class ResinspectError(Exception):
    """Base class: an error whose message is meant for the user as it is."""


class UnknownNameError(ResinspectError, ValueError):
    """A model, dataset, plugin or option name that is not known."""

    def __init__(self, kind: str, value: str, valid: Iterable[str], *, owner: str = ""):
        """``kind`` is a noun (``"plugin"``); ``owner`` what the names belong to (``"of plugin ablation"``)."""
        self.kind, self.value = kind, value
        self.valid = sorted(valid)
        self.closest = closest_match(value, self.valid)
        hint = f"; did you mean '{self.closest}'?" if self.closest else "."
        of = f" {owner}" if owner else ""
        super().__init__(f"unknown {kind}{of} '{value}'{hint} Valid {kind}s{of}: {', '.join(self.valid) or '(none)'}")


class CheckpointError(ResinspectError):
    """A checkpoint file that is missing, unreadable, foreign or does not fit the model."""


class DataError(ResinspectError):
    """A dataset that cannot be loaded (missing files, bad arguments)."""


class OptionError(ResinspectError, ValueError):
    """A plugin option that is unknown or has a bad value."""


class OutputError(ResinspectError):
    """The run directory (or a file in it) cannot be created or written: the path and the reason."""


class TrainingDiverged(ResinspectError):
    """The loss became NaN or infinite; the model holds the last good weights.

    ``history`` holds the metrics recorded up to that point.
    """

    def __init__(self, message: str, history: Any = None):
        super().__init__(message)
        self.history = history
