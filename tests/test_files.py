"""Tests for prunet.files: a file is replaced whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from prunet.files import atomic_path, write_bytes, write_text


def test_write_text_creates_folders_and_a_normal_file(tmp_path):
    path = write_text(tmp_path / "a" / "b" / "note.txt", "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    assert sorted(p.name for p in path.parent.iterdir()) == ["note.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_bytes(tmp_path / "model.bin", b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_interrupt_leaves_the_old_file(tmp_path):
    path = write_bytes(tmp_path / "model.bin", b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"new")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_temporary_is_hidden_beside_the_target_with_its_suffix(tmp_path):
    with atomic_path(tmp_path / "figure.png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert (tmp_path / "figure.png").read_bytes() == b"png"
