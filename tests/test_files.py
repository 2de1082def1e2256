import json
import os
import stat

import pytest

from minillm import files


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    files.atomic_write_json(target, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError):
        files.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp files left behind


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one afterwards."""
    previous = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_file_gets_the_mode_of_a_plain_write(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: what a plain write gives
        f.write("x")
    files.atomic_write_text(tmp_path / "atomic.txt", "x")
    files.atomic_write_bytes(tmp_path / "atomic.bin", b"x")
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "atomic.bin") == _mode(tmp_path / "plain.txt")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_replacing_a_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "config.json"
    target.write_text("{}")
    os.chmod(target, 0o640)
    files.atomic_write_json(target, {"a": 1})
    assert _mode(target) == 0o640 and json.loads(target.read_text()) == {"a": 1}


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        files.read_json(tmp_path / "nope.json")
    (tmp_path / "cut.json").write_text('{"a": ')
    with pytest.raises(ValueError, match="cut.json"):
        files.read_json(tmp_path / "cut.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json.*JSON object"):
        files.read_json(tmp_path / "list.json")

    class Custom(ValueError):
        pass

    with pytest.raises(Custom, match="nope.json"):
        files.read_json(tmp_path / "nope.json", error=Custom)
    with pytest.raises(Custom, match="cut.json"):
        files.read_json(tmp_path / "cut.json", error=Custom)
    (tmp_path / "ok.json").write_text('{"a": [1, "é"]}', encoding="utf-8")
    assert files.read_json(tmp_path / "ok.json") == {"a": [1, "é"]}
