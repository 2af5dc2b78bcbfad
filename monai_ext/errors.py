"""The exceptions of bad user input, shared by every layer of the package.

A bad input (a missing or unreadable file, a checkpoint of another architecture, an output location that cannot
be written) raises :class:`InputError` with one line that names the input and says what to do. The command line
prints that line and exits with status 2 (no traceback); a bundle run through ``monai.bundle`` raises it before
its engine starts. They sit at the bottom of the package so that every layer (checkpoints, engines, io) can
raise them.
"""

from __future__ import annotations

__all__ = ["InputError", "MissingInputError", "OutputExistsError"]


class InputError(ValueError):
    """A bad input or output location, found before any compute; the message is one line saying what to do."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file that does not exist (also a ``FileNotFoundError``)."""


class OutputExistsError(InputError, FileExistsError):
    """An output that exists and may not be replaced (also a ``FileExistsError``)."""
