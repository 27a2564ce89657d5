import pytest

from stylegan.fileio import atomic_path, atomic_write_json


def test_atomic_write_replaces_only_on_success(tmp_path):
    dest = tmp_path / "sub" / "a.json"
    atomic_write_json(dest, {"x": 1})
    assert dest.read_text().strip().startswith("{")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert '"x": 1' in dest.read_text()
    assert [p.name for p in dest.parent.iterdir()] == ["a.json"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    dest = tmp_path / "b.json"
    atomic_write_json(dest, {})
    mask = os.umask(0o022)
    os.umask(mask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~mask
