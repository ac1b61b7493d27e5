"""Which temp files of local saves are abandoned: the table of ``torpor.stale_temps``, row by row."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torpor import stale_temps

ME, OTHER = "aaaaaaaa", "bbbbbbbb"
HOUR = stale_temps.STALE_SECONDS


@pytest.mark.parametrize(
    ("name", "age", "alive", "stale"),
    [
        # written here (same host and pid namespace): the writer's pid decides, not the age
        (f".CKP-1_4.ckpt.tmp-{ME}-4242-0123abcd", 1.0, False, True),
        (f".CKP-1_4.ckpt.tmp-{ME}-4242-0123abcd", 10 * HOUR, True, False),
        (f".CKP-1_4.ckpt.tmp-{ME}-100-0123abcd", 1.0, True, True),  # this process's pid, not open: reused
        # another host or namespace: only the age decides
        (f".CKP-1_4.ckpt.tmp-{OTHER}-4242-0123abcd", HOUR - 1, None, False),
        (f".CKP-1_4.ckpt.tmp-{OTHER}-4242-0123abcd", HOUR + 1, None, True),
        # written before the owner was in the name
        (".CKP-1_4.ckpt.tmp-0123abcd", HOUR - 1, None, False),
        (".CKP-1_4.ckpt.tmp-0123abcd", HOUR + 1, None, True),
        # not a torpor temp file: never touched
        (".CKP-1_4.ckpt.tmp-notours", 100 * HOUR, None, False),
        (".bashrc", 100 * HOUR, None, False),
    ],
)
def test_staleness_table(name: str, age: float, alive: bool | None, stale: bool) -> None:
    assert stale_temps.is_stale(name, age, owner=ME, pid=100, alive=alive) is stale


def test_temp_names_carry_their_writer_and_parse_back(tmp_path: Path) -> None:
    path = stale_temps.temp_path(tmp_path / "CKP-1_4.ckpt")
    assert path.parent == tmp_path and path.name.startswith(".CKP-1_4.ckpt.tmp-")
    assert stale_temps.pid_of(path.name) == os.getpid()
    assert stale_temps.pid_of(".CKP-1_4.ckpt.tmp-0123abcd") is None


def test_files_this_process_has_open_are_never_removed(tmp_path: Path) -> None:
    path = stale_temps.temp_path(tmp_path / "CKP-1_4.ckpt")
    path.write_bytes(b"x")
    stale_temps.opened(path)
    try:
        assert stale_temps.remove_stale(tmp_path) == []
    finally:
        stale_temps.closed(path)
    assert stale_temps.remove_stale(tmp_path) == [path.name]  # own pid, no longer open: abandoned
