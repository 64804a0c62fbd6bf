"""sat_tf.atomic: the one atomic writer (files, streamed writers, folders)."""

import pytest

from sat_tf.atomic import atomic_path, atomic_write


def test_a_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "result.json"
    assert atomic_write(target, "{}\n") == target and target.read_text() == "{}\n"
    with atomic_path(target) as partial:  # a streaming writer: the old file stays until the end
        partial.write_bytes(b"new")
        assert target.read_text() == "{}\n" and partial.name == ".partial-result.json"
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == [
        "result.json"
    ]
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        partial.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"new"  # an error renames nothing
    assert not (target.parent / ".partial-result.json").exists()  # and leaves no half file
    folder = tmp_path / "export" / "1"
    stale = folder.parent / ".partial-1"
    (stale / "old").mkdir(parents=True)  # left by a killed export
    with atomic_path(folder) as partial:
        (partial / "saved_model.pb").mkdir(parents=True)
    assert [p.name for p in folder.iterdir()] == ["saved_model.pb"] and not stale.exists()
