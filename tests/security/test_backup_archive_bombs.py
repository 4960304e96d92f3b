"""Backup archives that would fill the data disk (issue 15, red-team finding M3): a compressed
tar (`r:*` expanded 560 bytes of xz to 1.1 GiB), a sparse member, a member longer than its
manifest says, members over the cap. Each is refused by `open_archive` before it writes more
than the manifest allows. Real age encryption, real tar files (GNU tar for the sparse one)."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from pyrage import encrypt, x25519

from appliance._stack import backup as archives


@pytest.fixture
def identity(tmp_path: Path) -> tuple[x25519.Identity, Path]:
    key = x25519.Identity.generate()
    path = tmp_path / "operator.key"
    path.write_text(str(key) + "\n")
    return key, path


def _manifest(members: dict[str, bytes], sizes: dict[str, int] | None = None) -> bytes:
    listed = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in members.items()
    }
    for name, size in (sizes or {}).items():
        listed[name]["size"] = size
    doc = {"format": archives.FORMAT, "kind": "online", "appliance_version": "0", "members": listed}
    return json.dumps(doc).encode()


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _sealed(tmp_path: Path, key: x25519.Identity, plain: bytes) -> Path:
    path = tmp_path / "archive.age"
    path.write_bytes(encrypt(plain, [key.to_public()]))
    return path


def _open(path: Path, ident: Path, work: Path, max_bytes: int = 1 << 30) -> None:
    with archives.open_archive(path, ident, work, max_bytes=max_bytes) as archive:
        assert archive.manifest


def test_a_plain_archive_opens(tmp_path: Path, identity: tuple[x25519.Identity, Path]) -> None:
    key, ident = identity
    data = b"x" * 1000
    plain = _tar([("manifest.json", _manifest({"stack.json": data})), ("stack.json", data)])
    path = _sealed(tmp_path, key, plain)
    with archives.open_archive(path, ident, tmp_path / "work") as archive:
        assert archive.member("stack.json").read_bytes() == data
        assert (archive.root.stat().st_mode & 0o077) == 0


def test_a_compressed_tar_is_refused_without_expanding_it(
    tmp_path: Path, identity: tuple[x25519.Identity, Path]
) -> None:
    key, ident = identity
    big = b"\0" * (64 << 20)
    plain = _tar([("manifest.json", _manifest({"stack.json": big})), ("stack.json", big)])
    bomb = lzma.compress(plain, format=lzma.FORMAT_XZ)
    assert len(bomb) < len(plain) // 1000
    path = _sealed(tmp_path, key, bomb)
    with pytest.raises(archives.BackupInvalid, match="does not read as a tar"):
        _open(path, ident, tmp_path / "work")
    assert not any((tmp_path / "work").rglob("stack.json"))


def test_a_sparse_member_is_refused(tmp_path: Path, identity: tuple[x25519.Identity, Path]) -> None:
    if shutil.which("tar") is None:
        pytest.skip("no GNU tar to write a sparse member")
    key, ident = identity
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "stack.json"
    with sparse.open("wb") as handle:
        handle.truncate(256 << 20)
        handle.write(b"data")
    content = sparse.read_bytes()
    (src / "manifest.json").write_bytes(_manifest({"stack.json": content}))
    plain = tmp_path / "plain.tar"
    subprocess.run(
        ["tar", "--format=gnu", "--sparse", "-cf", str(plain), "manifest.json", "stack.json"],
        cwd=src,
        check=True,
    )
    with tarfile.open(plain) as tar:
        assert tar.getmember("stack.json").issparse()
    assert plain.stat().st_size < 1 << 20
    path = _sealed(tmp_path, key, plain.read_bytes())
    with pytest.raises(archives.BackupInvalid, match="not a plain file"):
        _open(path, ident, tmp_path / "work")


def test_a_member_of_another_size_than_the_manifest_says_is_refused(
    tmp_path: Path, identity: tuple[x25519.Identity, Path]
) -> None:
    key, ident = identity
    data = b"y" * 4096
    manifest = _manifest({"stack.json": data}, sizes={"stack.json": 10})
    path = _sealed(tmp_path, key, _tar([("manifest.json", manifest), ("stack.json", data)]))
    with pytest.raises(archives.BackupInvalid, match="size its manifest says"):
        _open(path, ident, tmp_path / "work")


def test_an_archive_over_the_cap_is_refused_before_decryption(
    tmp_path: Path, identity: tuple[x25519.Identity, Path]
) -> None:
    key, ident = identity
    data = os.urandom(1 << 20)
    plain = _tar([("manifest.json", _manifest({"stack.json": data})), ("stack.json", data)])
    path = _sealed(tmp_path, key, plain)
    with pytest.raises(archives.BackupInvalid, match="cap of"):
        _open(path, ident, tmp_path / "work", max_bytes=1 << 19)
    assert not any((tmp_path / "work").rglob("stack.json"))
