"""Tests for sat_tf.evaluation, sat_tf.masking and sat_tf.reporting (under every backend;
reading tf.data datasets needs TensorFlow)."""

import json

import keras
import numpy as np
import pytest
from conftest import HAS_TENSORFLOW, needs_tensorflow, only_tensorflow

from sat_tf import backend, evaluation, jobs, masking
from sat_tf.rows import AttackSpec, Row

pytestmark = pytest.mark.backends
if HAS_TENSORFLOW:
    import tensorflow as tf

NUM_CLASSES, SIZE = 5, 8


def make_data(n, seed):
    """Five separable classes: a fixed random 8x8 prototype per class plus Gaussian noise."""
    protos = np.random.default_rng(123).uniform(40, 215, (NUM_CLASSES, SIZE, SIZE, 1))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = np.clip(protos[labels] + rng.normal(0, 25, (n, SIZE, SIZE, 1)), 0, 255)
    return images.astype(np.float32), labels.astype(np.int32)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1))
    h = keras.layers.Rescaling(1 / 127.5, -1.0)(keras.layers.Flatten()(inputs))
    h = keras.layers.Dense(32, activation="relu")(h)
    model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*make_data(512, seed=0), epochs=5, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def data():
    return make_data(64, seed=1)


class Quantized(keras.Model):
    """Gradient masking by construction: the input is rounded to multiples of 32, gradient 0."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def call(self, x, training=False):
        rounded = keras.ops.stop_gradient(keras.ops.round(x / 32.0) * 32.0)
        return self.inner(rounded + 0.0 * x, training=False)  # 0 * x: a zero, not None, gradient.


def test_parse_attack():
    spec = jobs.parse_attack
    assert spec("pgd-50x3") == AttackSpec("pgd", 50, 3)
    assert spec("PGD") == AttackSpec("pgd", 10, 1)
    assert spec("apgd-t") == AttackSpec("apgd-t", 100, 1)
    assert spec("fab-t-20") == AttackSpec("fab-t", 20)
    assert spec("square-1000").num_queries == 1000 and spec("square").num_steps is None
    assert spec("square-1000").label == "square-1000"
    assert spec("autoattack-fast") == AttackSpec("autoattack", version="fast")
    assert spec("clean").label == "clean" and spec("pgd-50x3").label == "pgd-50x3"
    for bad in ("pgd-", "cw", "pgd-fast", "square-10x"):
        with pytest.raises(ValueError, match="Received"):
            spec(bad)


def test_collect_reads_arrays(data):
    images, labels = data
    one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    for source in ((images, labels), (images, one_hot)):
        x, y = evaluation.collect(source, num_examples=50)
        np.testing.assert_array_equal(x, images[:50])
        np.testing.assert_array_equal(y, labels[:50])


@needs_tensorflow
def test_collect_reads_datasets(data):
    images, labels = data
    one_hot = tf.one_hot(labels, NUM_CLASSES)
    for source in (
        tf.data.Dataset.from_tensor_slices((images, labels)),
        tf.data.Dataset.from_tensor_slices((images, one_hot)).batch(10),
    ):
        x, y = evaluation.collect(source, num_examples=50)
        np.testing.assert_array_equal(x, images[:50])
        np.testing.assert_array_equal(y, labels[:50])


# TensorFlow only: the reports and plots do not depend on the backend, and every attack here is
# run under each backend by the tests below.
@only_tensorflow
def test_evaluate_writes_json_markdown_and_plots(model, data, tmp_path, capsys):
    results = evaluation.evaluate(
        model,
        data,
        attacks=["clean", "fgsm", "pgd-3", "pgd-10", "pgd-10x2", "square-100"],
        epsilons=[8, 32],
        surrogate=model,
        batch_size=32,
    )
    printed = capsys.readouterr().out
    assert "[PASS] outputs are logits" in printed and "[PASS] deterministic" in printed
    clean = np.mean(np.argmax(backend.to_numpy(model(data[0])), axis=1) == data[1])
    assert results.clean_accuracy == pytest.approx(clean)
    # The per-example worst case is at most every attack's accuracy at that epsilon.
    for eps in (8.0, 32.0):
        at_eps = [r.accuracy for r in results.rows if r.epsilon == eps and r.kind != "transfer"]
        assert results.worst_case[eps] <= min(at_eps)
    # PGD with 2 restarts keeps the worst case over restart 0 (same seed as pgd-10) and 1.
    assert results.accuracy("pgd-10x2", 32) <= results.accuracy("pgd-10", 32)
    assert results.accuracy("pgd-10", 32) < results.accuracy("pgd-10", 8) <= clean

    paths = results.save(tmp_path / "eval")
    saved = json.loads(paths["json"].read_text())
    assert saved["num_examples"] == 64 and len(saved["rows"]) == len(results.rows)
    assert {c["status"] for c in saved["checks"]} <= {"pass", "warn", "skip"}
    markdown = paths["markdown"].read_text()
    assert "| pgd-10x2 |" in markdown and "eps=32" in markdown and "worst case" in markdown
    for key in ("accuracy_vs_epsilon", "accuracy_vs_steps"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checks_pass_a_normal_model_and_flag_a_masked_one(model, data):
    """The quantized twin hides its gradients: Square and transfer beat white-box PGD on it."""
    kwargs = dict(attacks=["pgd-10", "square-300"], epsilons=[48], surrogate=model, verbose=False)
    normal = {c.name: c.passed for c in evaluation.evaluate(model, data, **kwargs).checks}
    assert False not in normal.values(), normal  # pass, or skip where nothing compares.
    masked = {
        c.name: c.passed for c in evaluation.evaluate(Quantized(model), data, **kwargs).checks
    }
    assert masked["black-box not stronger than white-box"] is False
    assert masked["transfer not stronger than white-box"] is False


def test_logits_and_determinism_checks(model, data):
    images = data[0]
    assert masking.check_logits(model, images).passed
    probabilities = keras.Sequential([model, keras.layers.Softmax()])
    assert masking.check_logits(probabilities, images).passed is False

    def noisy(x, training=False):
        return model(x, training=training) + keras.random.normal([len(x), NUM_CLASSES])

    assert masking.check_deterministic(model, images).passed
    randomized = masking.check_deterministic(noisy, images)
    assert randomized.passed is False and "version='rand'" in randomized.message
    assert jobs.parse_attack("autoattack-rand").version == "rand"


def _row(attack, kind, epsilon, accuracy, steps=10, restarts=1):
    return Row(
        attack=attack,
        kind=kind,
        epsilon=epsilon,
        accuracy=accuracy,
        num_steps=steps,
        num_restarts=restarts,
    )


def test_row_checks_against_hand_made_numbers():
    rows = [
        _row("clean", "clean", 0.0, 0.9),
        _row("pgd-10", "pgd", 4.0, 0.5),
        _row("pgd-10", "pgd", 8.0, 0.6),  # Accuracy rises with epsilon: suspicious.
        _row("pgd-50", "pgd", 8.0, 0.7, steps=50),  # More steps, higher accuracy: suspicious.
        _row("square", "square", 8.0, 0.4),  # Black-box beats white-box: suspicious.
        _row("pgd-20", "pgd", 128.0, 0.3, steps=20),  # Not ~0 at a huge epsilon.
    ]
    assert masking.check_epsilon_monotone(rows, tolerance=0.01).passed is False
    assert masking.check_more_iterations(rows, tolerance=0.01).passed is False
    assert masking.check_black_box_weaker(rows, tolerance=0.01).passed is False
    assert masking.check_large_epsilon(rows, epsilon=128.0).passed is False
    assert masking.check_transfer_weaker(rows, tolerance=0.01).passed is None  # No transfer row.
    fine = [
        _row("pgd-10", "pgd", 4.0, 0.5),
        _row("pgd-10", "pgd", 8.0, 0.3),
        _row("pgd-50", "pgd", 8.0, 0.295, steps=50),  # Within tolerance.
        _row("square", "square", 8.0, 0.35),
        _row("pgd-20", "pgd", 128.0, 0.0, steps=20),
    ]
    for check in (
        masking.check_epsilon_monotone,
        masking.check_more_iterations,
        masking.check_black_box_weaker,
    ):
        assert check(fine, tolerance=0.01).passed, check.__name__
    assert masking.check_large_epsilon(fine, epsilon=128.0).passed
    assert masking.Check("x", False, "y").line() == "[WARN] x: y"


def test_fixed_pgd_step_size_and_lookup_by_spec(model, data):
    results = evaluation.evaluate(
        model,
        data,
        attacks=["pgd-3", "pgd-3x2", "apgd-ce-5"],
        epsilons=[48],
        pgd_step_size=1.0,
        large_epsilon=None,
        verbose=False,
    )
    steps = {r.attack: r.step_size for r in results.rows}
    assert steps["pgd-3"] == steps["pgd-3x2"] == 1.0 and steps["apgd-ce-5"] is None
    assert results.accuracy("apgd-ce-5", 48) == results.accuracy("APGD-CE-5", 48.0)
    # Three 1-pixel steps after a random start hardly beat noise; APGD's 2 * eps steps do.
    assert results.accuracy("pgd-3", 48) > results.accuracy("apgd-ce-5", 48)


def run_one(model, spec, images, labels, *, epsilon, batch_size, **options):
    """(row, [N] robust) of one attack spec, through `evaluate`."""
    results = evaluation.evaluate(
        model,
        (images, labels),
        attacks=[spec],
        epsilons=[epsilon],
        batch_size=batch_size,
        checks=False,
        verbose=0,
        **options,
    )
    return results.rows[1], results.per_example.fooled_by[1] == -1


def test_only_examples_still_standing_are_attacked(model, data, monkeypatch):
    images, labels = data
    labels = np.where(np.arange(len(labels)) < 8, (labels + 1) % NUM_CLASSES, labels)  # 8 wrong
    eps = 24.0
    # FGSM is deterministic: attacking survivors only must give exactly the full attack's answer.
    fgsm = AttackSpec("fgsm")
    full = evaluation.attack_batch(model, fgsm, images, labels, epsilon=eps)
    _, robust = run_one(model, fgsm, images, labels, epsilon=eps, batch_size=16)
    np.testing.assert_array_equal(robust, full)

    sizes, original = [], jobs._gradient_attack

    def counting(*args):
        attack = original(*args)

        def count(x, y, ids):  # distinct examples: under JAX a last batch is padded with repeats
            sizes.append(len(np.unique(backend.to_numpy(ids))))
            return attack(x, y, ids)

        return count

    monkeypatch.setattr(jobs, "_gradient_attack", counting)
    row, robust = run_one(model, "pgd-5x3", images, labels, epsilon=eps, batch_size=16)
    correct = np.argmax(backend.to_numpy(model(images, training=False)), axis=1) == labels
    assert 0 < robust.sum() < correct.sum() < len(labels)  # the attack does something here
    assert not (robust & ~correct).any()
    assert sizes[0] == min(16, correct.sum())  # restart 1: the correct examples only
    assert sum(sizes) < 3 * correct.sum()  # later restarts: the survivors only
    assert row.accuracy == robust.mean() and row.num_restarts == 3


def test_padded_last_chunk_counts_nowhere(model, data):
    images, labels = data
    fgsm = AttackSpec("fgsm")  # deterministic: same answer whatever the batching
    _, whole = run_one(model, fgsm, images, labels, epsilon=24.0, batch_size=64)
    # 64 = 2 * 25 + 14: under XLA the last batch is padded to 16 with repeats of its own.
    row, ragged = run_one(
        model, fgsm, images, labels, epsilon=24.0, batch_size=25, jit_compile=True
    )
    np.testing.assert_array_equal(ragged, whole)
    assert row.accuracy == whole.mean()


def test_padding_repeats_the_last_batch_up_to_a_power_of_two():
    from sat_tf import passes

    found = list(passes.batches(np.arange(53), 25, pad=True))
    assert [(len(b), count) for b, count in found] == [(25, 25), (25, 25), (4, 3)]
    np.testing.assert_array_equal(found[-1][0], [50, 51, 52, 50])  # repeats count nowhere
    assert [len(b) for b, _ in passes.batches(np.arange(170), 100, pad=True)] == [100, 100]
    assert [len(b) for b, _ in passes.batches(np.arange(53), 25)] == [25, 25, 3]


@only_tensorflow
def test_one_trace_per_attack_config_over_a_whole_evaluation(model, data):
    from sat_tf.backend import tf as tf_backend

    fresh = keras.models.clone_model(model)  # its own entries in the compiled-function caches
    fresh.set_weights(model.get_weights())
    images, labels = data[0][:27], data[1][:27]  # batches of 12: a ragged last chunk of 3
    evaluation.evaluate(
        fresh,
        (images, labels),
        attacks=["pgd-3", "apgd-ce-5", "apgd-t-5", "square-30"],
        epsilons=[8, 16],
        batch_size=12,
        checks=False,
        verbose=False,
    )
    traces = {
        key: fn.experimental_get_tracing_count() for key, fn in tf_backend._COMPILED[fresh].items()
    }
    # Per epsilon: PGD; APGD-CE and APGD-T (init, segment each); Square (its start, its
    # queries): as many functions at each epsilon. APGD's and Square's batches also shrink as
    # examples are fooled: the same trace serves them. Plus one forward pass that checks every
    # adversarial batch.
    assert len(traces) >= 2 * 6 + 1 and (len(traces) - 1) % 2 == 0
    assert traces[("predict", False)] == 1
    assert set(traces.values()) == {1}, traces


def test_jit_compiled_attacks_agree_with_the_default_path(model, data):
    images, labels = data[0][:24], data[1][:24]
    kwargs = dict(epsilon=24.0, seed=0)
    for spec in ("pgd-5", "apgd-ce-10", "square-50"):
        spec = jobs.parse_attack(spec)
        plain = evaluation.attack_batch(model, spec, images, labels, **kwargs)
        xla = evaluation.attack_batch(model, spec, images, labels, jit_compile=True, **kwargs)
        # XLA may round the logits differently; at most one borderline example may flip.
        assert np.sum(plain != xla) <= 1, spec
        assert spec.kind != "pgd" or plain.sum() < len(labels)  # the attack does something


def test_every_registered_attack_parses_to_itself():
    for name, entry in jobs.ATTACKS.items():
        spec = jobs.parse_attack(name)
        assert spec.kind == name
        if entry.budget is not None:
            budget = spec.num_queries if entry.queries else spec.num_steps
            assert budget == entry.budget
    assert set(jobs.STAGES) < set(jobs.ATTACKS)
    for version in jobs.VERSIONS.values():  # AutoAttack's stages are registry names
        assert set(version["attacks"]) <= set(jobs.STAGES)


@needs_tensorflow
def test_collect_reads_only_as_far_as_num_examples():
    read = []

    def image(i):
        read.append(int(i))  # runs eagerly per element in tf.py_function
        return tf.fill([4, 4, 3], tf.cast(i, tf.float32)), tf.cast(i % 3, tf.int32)

    endless = tf.data.Dataset.range(10**9).repeat()  # a split that never ends
    endless = endless.map(lambda i: tf.py_function(image, [i], (tf.float32, tf.int32)))
    images, labels = evaluation.collect(endless.batch(4), num_examples=10)
    assert images.shape == (10, 4, 4, 3) and labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert len(read) < 40  # the batches it needed, not the split
