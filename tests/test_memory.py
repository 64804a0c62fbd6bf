"""Evaluation memory does not grow with --num_examples (`sat_tf.examples` reads a chunk at a time).

A small version of benchmarks/bench_memory.py: the same synthetic ImageNet-format TFRecords (smooth
random JPEGs, 1-based labels) at 112 px, the same `small_cnn` whose output bias sends 1 example in
50 on to the attacks, and `tools/eval.py` (clean + PGD-1 at 4 pixels) run for SMALL and for
LARGE = 10 x SMALL examples at the same batch, each in a fresh process whose peak RSS is its own
`ru_maxrss`. An evaluation that read every example into float32 before attacking would add at
least (LARGE - SMALL) * 112 * 112 * 3 * 4 bytes to the peak; the test checks that this is more
than three times what it tolerates, so that it cannot pass for want of data.
"""

import concurrent.futures
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_memory  # noqa: E402

IMAGE_SIZE = 112
BATCH_SIZE = 8  # chunks of 8 batches = 64 examples: SMALL is already 5 chunks
SMALL, LARGE = 320, 3200
MIB = 1 << 20
# Allowed growth: 10% of the small run's peak, the goal of benchmarks/bench_memory.py. No
# absolute slack: at this size the two peaks came out within 10 MiB of each other (~885 MiB).
RELATIVE = 0.10


def peaks(checkout, folder):
    """Peak RSS in bytes of `tools/eval.py` of `checkout` at SMALL and at LARGE examples
    (the two processes run side by side; each peak is its own)."""
    records = bench_memory.write_records(
        folder / "records", LARGE, image_size=IMAGE_SIZE, num_shards=4
    )
    model = bench_memory.save_model(folder / "model.keras", image_size=IMAGE_SIZE)

    def run(n):
        command = bench_memory.eval_command(
            checkout,
            records,
            model,
            folder / f"eval-{n}",
            num_examples=n,
            batch_size=BATCH_SIZE,
            image_size=IMAGE_SIZE,
        )
        return bench_memory.peak_rss(command, cwd=checkout, log_path=folder / f"eval-{n}.log")[0]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(run, (SMALL, LARGE)))


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_examples(tmp_path):
    small, large = peaks(ROOT, tmp_path)
    tolerance = RELATIVE * small
    # What holding the extra examples as float32 adds; collecting them all before attacking
    # holds about three times this (the batches, their concatenation, its float32 copy).
    held = (LARGE - SMALL) * IMAGE_SIZE * IMAGE_SIZE * 3 * 4
    assert held > 3 * tolerance, (
        f"the test cannot tell: {held / MIB:.0f} MiB of extra examples against a tolerance of "
        f"{tolerance / MIB:.0f} MiB (peak {small / MIB:.0f} MiB at {SMALL}); raise LARGE"
    )
    assert large - small <= tolerance, (
        f"peak RSS {small / MIB:.0f} MiB at {SMALL} examples, {large / MIB:.0f} MiB at {LARGE} "
        f"(+{(large - small) / MIB:.0f} MiB > {tolerance / MIB:.0f} MiB allowed)"
    )
