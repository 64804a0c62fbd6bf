"""Part of section 1 of `make bench`: what `--deterministic` costs per PGD-1 train step.

Op determinism (`tf.config.experimental.enable_op_determinism`) cannot be turned off again
inside a process, so each measurement is a child process: it builds the ResNet-20 PGD-1 step
(`common.step_callable`), runs warm-up steps, then times `--determinism-steps` steps by
process CPU time. Children with and without determinism alternate (A B A B ...), and the
ratio is the median of the per-round ratios.

Run alone: python benchmarks/bench_determinism.py [--determinism-rounds 3].
"""

import argparse
import json
import os
import subprocess
import sys

import common
import numpy as np

_CHILD = """
import json, sys, time
import tensorflow as tf
sys.path.insert(0, {here!r})
import common
if {deterministic}:
    tf.config.experimental.enable_op_determinism()
step = common.step_callable("resnet20", image_size={size}, batch_size={batch}, num_steps=1)
for _ in range(2):
    step()
start = common.clock()
for _ in range({steps}):
    step()
print(json.dumps(common.elapsed(start, {steps})))
"""


def _child(deterministic, args):
    code = _CHILD.format(
        here=os.path.dirname(os.path.abspath(__file__)),
        deterministic=deterministic,
        size=args.small_image_size,
        batch=args.small_batch_size,
        steps=args.determinism_steps,
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def determinism_cost(args):
    """(samples, Markdown): PGD-1 step CPU time with op determinism / without."""
    samples = {True: [], False: []}
    for round_index in range(args.determinism_rounds):
        for deterministic in (True, False) if round_index % 2 else (False, True):
            samples[deterministic].append(_child(deterministic, args))
    on, off = np.array(samples[True]), np.array(samples[False])
    wall, cpu = common.ratio(on, off)
    rows = [
        (
            f"resnet20 PGD-1, {args.small_image_size} px, batch {args.small_batch_size}",
            f"{common.median_ms(off)[1]:.0f} / {common.median_ms(on)[1]:.0f}",
            f"**{cpu:.3f}**",
            f"{wall:.3f}",
            common.spread(on, off),
        )
    ]
    header = (
        "`--deterministic` cost",
        "step CPU ms off / on",
        "on / off, CPU",
        "wall",
        "range (wall)",
    )
    text = common.table(header, rows)
    text += (
        f"\n\nEach sample: a fresh process, 2 warm-up steps, then {args.determinism_steps} "
        f"timed steps; {args.determinism_rounds} rounds, alternating."
    )
    return samples, text


def add_arguments(parser):
    parser.add_argument("--determinism-rounds", type=int, default=3, help="process pairs")
    parser.add_argument("--determinism-steps", type=int, default=5, help="timed steps each")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-image-size", type=int, default=32)
    parser.add_argument("--small-batch-size", type=int, default=32)
    add_arguments(parser)
    args = parser.parse_args()
    print(common.machine_line() + "\n")
    print(determinism_cost(args)[1])


if __name__ == "__main__":
    main()
