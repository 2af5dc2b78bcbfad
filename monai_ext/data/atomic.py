"""Atomic file output: a destination file either appears complete or not at all.

The one atomic writer of the package. Every file the package writes as a whole (prepared dataset volumes in
:mod:`monai_ext.data`, metric tables of :mod:`monai_ext.metrics` and :mod:`monai_ext.engines`, the outputs of
:mod:`monai_ext.io`) goes through :func:`atomic_output`: the content is written to a hidden temporary file in
the destination's directory and moved onto the destination with ``os.replace`` (atomic on POSIX and Windows
within one file system). The module lives in :mod:`monai_ext.data`, the lowest layer that writes files, so
that every layer above can import it. (Downloads keep their own ``<file>.part``, :mod:`monai_ext.data.download`:
a partial download must survive a failure to be resumed, which is the opposite of this module's clean-up.)

A failure part-way (an exception, a full disk) removes the temporary file and leaves any earlier file at the
destination untouched, so a command line run that fails exits without partial outputs. Written files and
folders get the ordinary modes of the process's umask (as ``open`` and ``mkdir`` give them), not the private
modes of Python's temporary files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_output", "umask_mode"]


def umask_mode(path: str | os.PathLike, mode: int | None = None) -> None:
    """Give ``path`` the mode a new file (``0o666``) or folder (``0o777``) gets under the current umask."""
    path = Path(path)
    if mode is None:
        mode = 0o777 if path.is_dir() else 0o666
    umask = os.umask(0o022)  # reading the umask means setting it; restore it at once
    os.umask(umask)
    path.chmod(mode & ~umask)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding a temporary path to write ``path``'s content to.

    The temporary name ends with ``path``'s file name (so writers that choose the format from the
    extension, such as ``itk.imwrite`` for ``.nii.gz``, behave the same). On a normal exit it replaces
    ``path``; on an exception it is deleted and the exception propagates. Missing parent directories
    are created.

    Example::

        with atomic_output("out/warped.nii.gz") as tmp:
            itk.imwrite(image, str(tmp))
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output path {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{path.name}", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise OSError(f"writing {path} produced no data")
        umask_mode(tmp)  # mkstemp makes the file private (0o600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
