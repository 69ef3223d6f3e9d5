"""Files written whole (provlae.atomic): a failed write leaves the file as it was and no temporary behind."""
from __future__ import annotations

import json

import pytest

from provlae.atomic import TMP_MARK, atomic_path, remove_stale_tmp, write_atomic
from sweeps import sweep_folder


def test_a_write_replaces_the_file_whole(tmp_path):
    path = write_atomic(tmp_path / "new" / "a.json", '{"a": 1}')  # its folder is made
    assert path.read_text() == '{"a": 1}'
    write_atomic(path, b'{"a": 2}')
    assert path.read_text() == '{"a": 2}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


@pytest.mark.parametrize("existing", [None, "before"])
def test_a_failed_write_leaves_no_partial_file(tmp_path, existing):
    path = tmp_path / "a.txt"
    if existing is not None:
        path.write_text(existing)
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_text("half of it")
        raise RuntimeError("disk full")
    assert (path.read_text() if path.exists() else None) == existing
    assert [p.name for p in tmp_path.iterdir()] == ([] if existing is None else ["a.txt"])


def test_a_write_that_cannot_serialise_leaves_nothing(tmp_path):
    with pytest.raises(TypeError), atomic_path(tmp_path / "a.json") as tmp, open(tmp, "w") as f:
        json.dump({"a": object()}, f)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / f".a.npy{TMP_MARK}123-abcd").write_bytes(b"x")
    (tmp_path / "a.npy").write_bytes(b"y")
    remove_stale_tmp(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_the_sweep_folder_writes_local_files_whole(tmp_path):
    folder = str(tmp_path / "storage" / "sweep")
    sweep_folder.write_json(folder, "provlae_sweep.json", {"trials": ["x"]})
    assert sweep_folder.read_json(folder, "provlae_sweep.json") == {"trials": ["x"]}
    assert [p.name for p in (tmp_path / "storage" / "sweep").iterdir()] == ["provlae_sweep.json"]


def test_the_sweep_folder_writes_remote_files_through_its_file_system(monkeypatch):
    """Remote storage (s3://...) keeps pyarrow's own write and move."""
    from pyarrow.fs import FileSelector, _MockFileSystem

    fs = _MockFileSystem()
    monkeypatch.setattr(sweep_folder, "filesystem", lambda folder: (fs, "bucket/sweep"))
    sweep_folder.write_json("s3://bucket/sweep", "provlae_sweep.json", {"trials": ["x"]})
    assert sweep_folder.read_json("s3://bucket/sweep", "provlae_sweep.json") == {"trials": ["x"]}
    assert [i.base_name for i in fs.get_file_info(FileSelector("bucket/sweep"))] == ["provlae_sweep.json"]
