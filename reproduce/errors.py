"""The suite's error classes, at the bottom of the import graph so that every layer can raise them.

The command line (``reproduce.cli``) turns a :class:`UsageError` into one ``error:`` line with exit
status 2 and a :class:`RunStopped` into its message and status; ``python -m reproduce.pipeline`` does
the same for :class:`ParamsError`.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A setting, name, path or dataset layout that cannot work: one ``error:`` line, exit status 2."""


class SettingsError(UsageError):
    """A recipe value, key or command-line setting that cannot work; raised before any data is read."""


class ParamsError(ValueError):
    """params.yaml lacks something a stage needs, or holds a value it cannot use."""


class RunStopped(Exception):
    """A run that ended early on purpose (signal, non-finite loss): ``message`` and exit ``status``."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
