"""Atomic writes of files and folders."""

import os
import stat

from bpsim.atomic import atomic_dir, write_text


def test_written_file_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text(tmp_path / "out.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o644


def test_written_folder_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "folder") as folder:
            (folder / "a.txt").write_text("a")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    assert (tmp_path / "folder" / "a.txt").read_text() == "a"
