"""Resumable, checksum-verified downloads and idempotent archive extraction.

``monai.apps.download_url`` verifies a hash but cannot resume: it downloads into a fresh temporary
directory on every call, so an interrupted multi-GB transfer (e.g. the 6.6 GB OASIS archive) starts
again from zero, and it moves the file across file systems (not atomic). :func:`download_file`
therefore uses ``urllib`` directly: the bytes go to ``<dest>.part``, an interrupted transfer is
continued with an HTTP ``Range`` request, and only a complete, verified file is renamed to ``dest``
(``os.replace``, atomic on one file system). Extraction reuses MONAI's path-traversal-safe
``monai.apps.utils.extractall`` and adds a completion marker so that an interrupted extraction is
redone instead of being mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from monai.apps.utils import extractall

__all__ = ["DownloadError", "ChecksumError", "download_file", "extract_archive", "sha256sum"]

_CHUNK = 1 << 20
_ARCHIVE_TYPES = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar.gz", ".tgz": "tar.gz"}


class DownloadError(RuntimeError):
    """A download could not be completed (network failure, HTTP error, truncated transfer)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected SHA-256."""


def sha256sum(path: str | os.PathLike) -> str:
    """Hex SHA-256 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 must be a 64-character hex digest or None, got {sha256!r}")
    return sha256.lower()


class _Progress:
    """Single-line progress on stderr, refreshed at most twice per second."""

    def __init__(self, name: str, total: int | None, done: int, enabled: bool) -> None:
        self.name, self.total, self.done, self.enabled = name, total, done, enabled
        self._last = 0.0

    def update(self, n: int, final: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < 0.5):
            return
        self._last = now
        mb = self.done / 1e6
        text = f"{mb:.1f} MB"
        if self.total:
            text += f" of {self.total / 1e6:.1f} MB ({100 * self.done / self.total:.0f}%)"
        sys.stderr.write(f"\rdownloading {self.name}: {text}" + ("\n" if final else ""))
        sys.stderr.flush()


def _open(url: str, offset: int, timeout: float):
    """Open ``url`` from byte ``offset``; returns ``(response or None, resumed)``; None = nothing left."""
    request = urllib.request.Request(url, headers={"User-Agent": "monai-registration"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http(s) URL from the caller)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset and _range_total(err.headers) in (None, offset):
            return None, True  # the partial file already holds every byte
        hint = (
            "The partial download does not match the file on the server: delete the .part file and run again."
            if err.code == 416
            else "Check that the URL is still valid (the dataset may have moved) or download the file by hand."
        )
        raise DownloadError(
            f"download of {url} failed: the server answered HTTP {err.code} {err.reason}. {hint}"
        ) from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"could not reach {url} ({reason}). Check the network connection / proxy settings, or download "
            "the file by hand and place it at the destination path, then run again."
        ) from err
    resumed = response.status == 206
    content_range = response.headers.get("Content-Range", "")
    if resumed and not content_range.startswith(f"bytes {offset}-"):
        response.close()
        raise DownloadError(f"{url} answered a resume request from byte {offset} with {content_range!r}")
    return response, resumed


def _range_total(headers) -> int | None:
    """Total size from a ``Content-Range: bytes */N`` header, if any."""
    match = re.fullmatch(r"bytes \*/(\d+)", (headers or {}).get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, resuming an interrupted transfer and verifying the checksum.

    Args:
        url: ``http(s)://`` or ``file://`` URL.
        dest: destination file; its parent folder is created. If ``dest`` already exists the download
            is skipped (after checking ``sha256`` when given).
        sha256: expected hex SHA-256 of the complete file, or ``None`` to skip verification.
        progress: print a progress line to stderr.
        timeout: socket timeout in seconds for connecting and for each read.

    Returns:
        ``dest`` as a ``Path``.

    Raises:
        DownloadError: the server cannot be reached, answers with an HTTP error, or the transfer
            stops early (the bytes received so far stay in ``<dest>.part``; calling again resumes).
        ChecksumError: the complete file has the wrong SHA-256; ``<dest>.part`` is deleted and
            ``dest`` is not created.
    """
    sha256 = _check_sha256(sha256)
    dest = Path(dest)
    if dest.exists():
        if sha256 is not None and sha256sum(dest) != sha256:
            raise ChecksumError(
                f"existing file {dest} does not have the expected sha256 {sha256}; delete it and download again"
            )
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    response, resumed = _open(url, offset, timeout)
    if response is not None:
        with response:
            if not resumed:
                offset = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            bar = _Progress(dest.name, total, offset, progress)
            try:
                with open(part, "ab" if resumed else "wb") as stream:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        stream.write(chunk)
                        bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:  # timeouts, resets, broken transfers
                raise DownloadError(
                    f"download of {url} was interrupted ({err}); {part.stat().st_size} bytes are kept in {part}. "
                    "Run again to resume."
                ) from err
            bar.update(0, final=True)
        received = part.stat().st_size
        if total is not None and received != total:
            raise DownloadError(
                f"download of {url} stopped early ({received} of {total} bytes, kept in {part}). Run again to resume."
            )
    if sha256 is not None:
        actual = sha256sum(part)
        if actual != sha256:
            part.unlink()
            raise ChecksumError(
                f"sha256 of the file downloaded from {url} is {actual}, expected {sha256}; the partial file was "
                "deleted. The download was corrupted or the file on the server changed: retry, and if it fails "
                "again check the expected checksum."
            )
    os.replace(part, dest)
    return dest


def _archive_type(path: Path) -> str:
    for suffix, kind in _ARCHIVE_TYPES.items():
        if path.name.lower().endswith(suffix):
            return kind
    raise ValueError(f"path must name a .zip, .tar, .tar.gz or .tgz archive, got {path.name!r}")


def extract_archive(path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a ``.zip`` / ``.tar`` / ``.tar.gz`` archive into the folder ``dest`` (idempotent).

    The archive is unpacked into a hidden temporary folder inside ``dest``, its top-level entries are
    moved into ``dest`` and a marker file ``dest/.<archive name>.extracted`` is written last. A second
    call with the marker present does nothing; an interrupted extraction (no marker) is redone.
    Member paths that would escape ``dest`` (absolute, ``..``, links) are rejected by MONAI's
    ``extractall``.

    Returns:
        ``dest`` as a ``Path``.
    """
    path, dest = Path(path), Path(dest)
    kind = _archive_type(path)
    if not path.is_file():
        raise FileNotFoundError(f"archive not found: {path}")
    marker = dest / f".{path.name}.extracted"
    if marker.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f".{path.name}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    extractall(path, staging, file_type=kind, has_base=False)
    for entry in staging.iterdir():
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)
    staging.rmdir()
    marker.touch()
    return dest
