"""Atomic writes end with the mode the umask gives, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

import pytest

from diffmask.artifacts import atomic_write_json, atomic_write_text


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
                         ids=["umask022", "umask002", "umask077"])
def test_atomic_writes_get_the_mode_of_the_umask(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        written = [
            atomic_write_text(tmp_path / "report.md", "x"),
            atomic_write_json(tmp_path / "m" / "metrics.json", {}),
        ]
        atomic_write_text(tmp_path / "report.md", "replaced")  # a rewrite keeps it so
    finally:
        os.umask(old)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert (tmp_path / "report.md").read_text() == "replaced"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
