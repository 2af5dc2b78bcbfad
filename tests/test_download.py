"""Resumable, verified downloads against a local HTTP server (127.0.0.1, a thread), and archive extraction."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile

import pytest
from http_server import closed_port_url, serve

from monai_ext.data.download import ChecksumError, DownloadError, download_file, extract_archive


PAYLOAD = bytes(range(256)) * 4000  # 1 MB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_verifies_and_reports_progress(tmp_path, capsys):
    with serve({"/f.bin": PAYLOAD}) as server:
        dest = download_file(server.url + "/f.bin", tmp_path / "sub" / "f.bin", sha256=SHA.upper())
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "sub" / "f.bin.part").exists()
    assert "downloading f.bin" in capsys.readouterr().err
    # a second call finds the verified file and makes no request
    with serve({"/f.bin": PAYLOAD}) as server:
        download_file(server.url + "/f.bin", dest, sha256=SHA)
        assert server.requests == []


def test_resume_after_truncated_transfer(tmp_path):
    dest = tmp_path / "f.bin"
    with serve({"/f.bin": PAYLOAD}) as server:
        server.cut["/f.bin"] = 300_000
        with pytest.raises(DownloadError, match="resume"):
            download_file(server.url + "/f.bin", dest, sha256=SHA, progress=False)
        part = tmp_path / "f.bin.part"
        assert not dest.exists() and part.stat().st_size == 300_000
        download_file(server.url + "/f.bin", dest, sha256=SHA, progress=False)
        assert server.requests == [("/f.bin", None), ("/f.bin", "bytes=300000-")]
    assert dest.read_bytes() == PAYLOAD and not part.exists()


def test_resume_when_server_ignores_range_restarts_cleanly(tmp_path):
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"garbage-from-an-older-attempt")
    with serve({"/f.bin": PAYLOAD}) as server:
        server.ignore_range = True
        download_file(server.url + "/f.bin", dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_file_is_finished_without_body(tmp_path):
    """A .part already holding every byte: the server answers 416 and the file is verified and renamed."""
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD)
    with serve({"/f.bin": PAYLOAD}) as server:
        download_file(server.url + "/f.bin", tmp_path / "f.bin", sha256=SHA, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_part_file_longer_than_the_server_file_is_reported(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD + b"extra")
    with serve({"/f.bin": PAYLOAD}) as server, pytest.raises(DownloadError, match="HTTP 416.*delete the .part"):
        download_file(server.url + "/f.bin", tmp_path / "f.bin", progress=False)
    assert not (tmp_path / "f.bin").exists()


def test_wrong_checksum_leaves_nothing(tmp_path):
    dest = tmp_path / "f.bin"
    with serve({"/f.bin": PAYLOAD}) as server, pytest.raises(ChecksumError, match="expected " + "0" * 64):
        download_file(server.url + "/f.bin", dest, sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_with_wrong_checksum_is_an_error(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"other")
    with pytest.raises(ChecksumError, match="delete it"):
        download_file("http://127.0.0.1:9/unused", dest, sha256=SHA)


def test_offline_error_names_url_and_remedy(tmp_path):
    url = closed_port_url()
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "f.bin", timeout=5)
    message = str(info.value)
    assert url in message and "network" in message and "by hand" in message
    assert list(tmp_path.iterdir()) == []


def test_http_error_names_status_and_url(tmp_path):
    with serve({}) as server, pytest.raises(DownloadError, match="HTTP 404") as info:
        download_file(server.url + "/missing.tar", tmp_path / "m.tar")
    assert server.url + "/missing.tar" in str(info.value)


def test_bad_sha256_argument():
    with pytest.raises(ValueError, match="sha256"):
        download_file("http://127.0.0.1:9/x", "x", sha256="abc")


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("name, build", [("a.tar.gz", _tar_gz), ("a.zip", _zip)])
def test_extract_archive_is_idempotent_and_redoes_interrupted_runs(tmp_path, name, build):
    archive = tmp_path / name
    archive.write_bytes(build({"top.txt": b"1", "dir/inner.txt": b"2"}))
    dest = tmp_path / "out"
    extract_archive(archive, dest)
    assert (dest / "top.txt").read_bytes() == b"1" and (dest / "dir" / "inner.txt").read_bytes() == b"2"
    (dest / "top.txt").write_bytes(b"edited")
    extract_archive(archive, dest)  # marker present: nothing is redone
    assert (dest / "top.txt").read_bytes() == b"edited"
    (dest / f".{name}.extracted").unlink()  # as if the previous run stopped before finishing
    (dest / f".{name}.extracting").mkdir()
    extract_archive(archive, dest)
    assert (dest / "top.txt").read_bytes() == b"1"
    assert sorted(p.name for p in dest.iterdir()) == sorted([f".{name}.extracted", "dir", "top.txt"])


def test_extract_archive_rejects_unsafe_paths_and_unknown_types(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(_tar_gz({"../evil.txt": b"x"}))
    with pytest.raises(ValueError, match="Unsafe"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(ValueError, match="archive"):
        extract_archive(tmp_path / "file.rar", tmp_path / "out")
