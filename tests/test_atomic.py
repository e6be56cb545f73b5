"""Artefacts appear whole or not at all, readable like any file the user makes."""

from __future__ import annotations

import os
import stat

import pytest

from tunemake.atomic import atomic_dir, atomic_file


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_outputs_get_the_usual_modes_not_private_temp_ones(tmp_path):
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("w")
    with atomic_file(tmp_path / "stats.json") as handle:
        handle.write("{}")
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask()
    assert stat.S_IMODE((tmp_path / "stats.json").stat().st_mode) == 0o666 & ~umask()


def test_a_failure_leaves_the_old_target_and_no_temporary(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["old"]
