"""atomic_write: the target appears complete or stays as it was, and no temporary is left behind."""

import os

import pytest

from lmdiff_core.atomic import atomic_write


def test_file_replaced_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "good" and os.listdir(tmp_path) == ["out.json"]
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.json.")
        tmp.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_folder_replaced_whole(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, folder=True) as tmp:
            (tmp / "new.bin").write_text("half")
            raise KeyboardInterrupt
    assert sorted(os.listdir(target)) == ["old.bin"] and os.listdir(tmp_path) == ["ckpt"]
    with atomic_write(target, folder=True) as tmp:
        (tmp / "new.bin").write_text("new")
    assert sorted(os.listdir(target)) == ["new.bin"] and os.listdir(tmp_path) == ["ckpt"]
