"""One sha256 of files (valuegate/digests.py) and one cache root (valuegate/home.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from valuegate.digests import sha256_file, sha256_labelled, sha256_path
from valuegate.home import valuegate_home


def test_file_and_folder_digests(tmp_path: Path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_bytes(b"bee")
    (tmp_path / "d" / "sub" / "a.txt").write_bytes(b"a" * (5 << 20))  # more than one read chunk
    assert sha256_file(tmp_path / "d" / "b.txt") == hashlib.sha256(b"bee").hexdigest()
    assert sha256_path(tmp_path / "d" / "b.txt") == hashlib.sha256(b"bee").hexdigest()
    want = hashlib.sha256(b"b.txt" + b"bee" + b"sub/a.txt" + b"a" * (5 << 20)).hexdigest()
    assert sha256_path(tmp_path / "d") == want
    renamed = [("c.txt", tmp_path / "d" / "b.txt")]
    assert sha256_labelled(renamed) != sha256_labelled([("b.txt", tmp_path / "d" / "b.txt")])


def test_cache_root(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("VALUEGATE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid per the XDG spec: ignored
    assert valuegate_home() == Path.home() / ".cache" / "valuegate"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert valuegate_home() == tmp_path / "valuegate"
    monkeypatch.setenv("VALUEGATE_HOME", str(tmp_path / "vg"))
    assert valuegate_home() == tmp_path / "vg"
