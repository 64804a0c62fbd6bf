"""sat_tf.evalstate: a state file resumes only when it is whole, unedited and in range; a damaged,
forged or oversized one is refused in one line before anything is attacked or decompressed."""

import io
import json
import tracemalloc
import zipfile

import numpy as np
import pytest
from conftest import BACKEND
from test_autoattack import EPSILON, make_data, train_tiny_model

from sat_tf import evalstate, evaluation

pytestmark = pytest.mark.backends

OPTIONS = dict(attacks=["clean", "pgd-3x2"], epsilons=[EPSILON], batch_size=8, checks=False)


@pytest.fixture(scope="module")
def model():
    return train_tiny_model()


@pytest.fixture(scope="module")
def data():
    return make_data(24, seed=1)


@pytest.fixture(scope="module")
def finished(model, data, tmp_path_factory):
    """The bytes of a finished evaluation's state, and its results."""
    path = tmp_path_factory.mktemp("state") / "state.npz"
    results = evaluation.evaluate(model, data, **OPTIONS, verbose=0, state=path)
    return path.read_bytes(), results


def arrays_of(raw):
    with np.load(io.BytesIO(raw), allow_pickle=False) as saved:
        return {name: saved[name] for name in saved.files}


def write(path, arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


def refused(model, data, path, match):
    before = path.read_bytes()
    with pytest.raises(evalstate.StateMismatchError, match=match) as info:
        evaluation.evaluate(model, data, **OPTIONS, verbose=0, state=path)
    assert len(str(info.value).splitlines()) == 1 and "--discard_state" in str(info.value)
    assert path.read_bytes() == before  # a refusal changes nothing


def test_a_whole_state_resumes_to_the_same_results(model, data, finished, tmp_path):
    raw, results = finished
    path = tmp_path / "state.npz"
    path.write_bytes(raw)
    again = evaluation.evaluate(model, data, **OPTIONS, verbose=0, state=path)
    assert [r.accuracy for r in again.rows] == [r.accuracy for r in results.rows]


@pytest.mark.parametrize(
    "edit",
    [
        lambda a: a["fooled_by"].fill(-1),  # every example robust: a 100% result
        lambda a: a["position"].__setitem__((1, 0), 0),  # a finished job made unfinished
        lambda a: a["seconds"].__setitem__(0, 1e9),
    ],
)
def test_an_edited_record_is_refused(model, data, finished, tmp_path, edit):
    arrays = arrays_of(finished[0])
    edit(arrays)
    path = tmp_path / "state.npz"
    write(path, arrays)
    refused(model, data, path, "edited or damaged")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("fooled_by", 7, "fooled_by"),  # a pass the job does not have
        ("fooled_by", -3, "fooled_by"),
        ("position", 99, "position"),  # past the last pass
        ("position", -1, "position"),
        ("batches", -2, "batches"),
    ],
)
def test_values_out_of_range_are_refused_even_with_a_recomputed_digest(
    model, data, finished, tmp_path, field, value, match
):
    arrays = arrays_of(finished[0])
    arrays[field].flat[0] = value
    fingerprint = json.loads(str(arrays["fingerprint"]))
    arrays["digest"] = np.array(evalstate.digest(fingerprint, arrays))
    path = tmp_path / "state.npz"
    write(path, arrays)
    refused(model, data, path, match)


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # truncated
        lambda raw: b"",  # empty
        lambda raw: b"PK\x05\x06" + b"\x00" * 18,  # an empty zip
    ],
)
def test_a_damaged_file_is_one_line(model, data, finished, tmp_path, damage):
    path = tmp_path / "state.npz"
    path.write_bytes(damage(finished[0]))
    refused(model, data, path, "not a readable")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda a: a.pop("position"), "members"),  # a missing member
        (lambda a: a.update(extra=np.zeros(3)), "members"),  # an unexpected one
        (lambda a: a.update(fooled_by=a["fooled_by"].astype(np.float64)), "fooled_by"),
        (lambda a: a.update(position=a["position"][:, :1]), "position"),
        (lambda a: a.update(fingerprint=np.array(3)), "fingerprint"),
    ],
)
def test_wrong_members_are_one_line(model, data, finished, tmp_path, edit, match):
    arrays = arrays_of(finished[0])
    edit(arrays)
    path = tmp_path / "state.npz"
    write(path, arrays)
    refused(model, data, path, match)


def test_a_deflate_bomb_is_refused_from_the_zip_directory(model, data, finished, tmp_path):
    arrays = arrays_of(finished[0])
    path = tmp_path / "state.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            archive.writestr(f"{name}.npy", buffer.getvalue())
        bomb = io.BytesIO()
        np.save(bomb, np.zeros(2**25, np.int16))  # 64 MiB of zeros, a few KiB deflated
        archive.writestr("seconds.npy", bomb.getvalue())  # a second, huge "seconds"
    tracemalloc.start()
    try:
        refused(model, data, path, "not a readable")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20  # nothing was decompressed


def test_a_resume_under_other_settings_is_refused(model, data, finished, tmp_path):
    path = tmp_path / "state.npz"
    evaluation.evaluate(
        model, data, **OPTIONS, verbose=0, state=path, settings={"deterministic": False}
    )
    with pytest.raises(evalstate.StateMismatchError, match=r"deterministic \(False -> True\)"):
        evaluation.evaluate(
            model, data, **OPTIONS, verbose=0, state=path, settings={"deterministic": True}
        )


def test_a_state_of_another_backend_is_refused(model, data, finished, tmp_path):
    """Another backend's numbers differ in the last bits: its record does not resume here. A
    TensorFlow state (the default backend) has no "backend" in its fingerprint, as before."""
    arrays = arrays_of(finished[0])
    fingerprint = json.loads(str(arrays["fingerprint"]))
    assert fingerprint.get("backend") == (None if BACKEND == "tensorflow" else BACKEND)
    other = "jax" if BACKEND == "tensorflow" else None
    fingerprint["backend"] = other
    if other is None:  # as TensorFlow writes it
        del fingerprint["backend"]
    arrays["fingerprint"] = np.array(json.dumps(fingerprint))
    arrays["digest"] = np.array(evalstate.digest(fingerprint, arrays))
    path = tmp_path / "state.npz"
    write(path, arrays)
    here = None if BACKEND == "tensorflow" else BACKEND
    refused(model, data, path, rf"the Keras backend \({other} -> {here}\)")
