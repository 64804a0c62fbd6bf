"""Robustness evaluation of a trained classifier: clean, PGD-K over epsilons, optional AutoAttack.

    python tools/eval.py --model_dir=runs/demo/silu                  # the run's data and epsilon
    python tools/eval.py --model_path=m.keras --output_dir=eval_m --image_size=224 \
        --dataset=tfrecord:/data/validation-* --epsilons=4 --num_steps=10,20,50,200 --step_size=1
    python tools/eval.py --model_dir=runs/cifar10/wrn --protocol=robustbench --dataset=tfds:cifar10
    python tools/eval.py --model_dir=runs/imagenet/r50 --protocol=robustbench \
        --robustbench_ids=imagenet_test_image_ids.txt --dataset=tfrecord:/data/imagenet

Every flag is a field of `sat_tf.config.EvalConfig` (same name, same meaning); the evaluation is
`sat_tf.evalrun.run`, which the flags below describe.

The default protocol is the official SAT one: untargeted L-inf PGD, random start, K in
--num_steps, at each epsilon in pixels, with the run's evaluation step (--eval_step_size of its
config.json; 1 pixel for the paper's ImageNet rows, and 1 for a bare .keras file). Writes
results.json, results.md, summary.json and plots to --output_dir, and appends the evaluation to the
run's robustness card. A bare .keras file (--model_path) is evaluated into --output_dir only, its
card there too; an output folder outside the run must be new, empty or one of ours.

--protocol=robustbench (sat_tf.robustbench, docs/robustbench.md) fixes the attack (AutoAttack,
--autoattack_version), the epsilon (cifar10 8/255 = 8 pixels, imagenet 4/255 = 4 pixels) and the
examples (CIFAR-10: the first 10,000 test images; ImageNet: the 5,000 validation images named in
--robustbench_ids, from a tfrecord: or folder: copy of the validation set); --num_examples=N takes
the first N. Writes robustbench_<leaderboard>_Linf.json (a RobustBench model_info entry) to
--output_dir and appends the evaluation to the card.

Long runs: a first line gives the work ahead (examples, attacks, worst-case gradients and forward
passes) and a time estimate from one timed batch; then each attack pass shows the examples done,
the accuracy so far and an ETA (a Keras progress bar on a terminal, a line every ~5%
otherwise; --noprogress prints the results only). Every finished batch is recorded in --output_dir
(eval_state.npz; robustbench_<leaderboard>_Linf_state.npz): after a kill, the same command continues
from the first unfinished batch and ends with the numbers of an uninterrupted run. A changed
model, data, attack, seed or batch size refuses, naming what changed (--discard_state starts
afresh). The record is removed once the reports are written. Examples are read and attacked
--chunk_size at a time (default 8 batches), so memory does not grow with --num_examples.

Many devices or machines (either protocol, docs/evaluation.md): run the same command with
--shard=I/N for I = 0 .. N-1 (one process per device: CUDA_VISIBLE_DEVICES=I); each evaluates the
examples whose index is I mod N into <output>/shard-I-of-N and resumes on its own. --status
says which shards are done, running, stopped or missing; the same command with --merge (instead
of --shard) checks the shards, joins them and writes the reports and card entry of the whole run.

Backends: KERAS_BACKEND=jax runs the model and the attacks under JAX (the same per-example
results as under TensorFlow, the default; a record is resumed and merged only under the backend
that wrote it). Every --dataset is a tf.data pipeline, so TensorFlow reads the data either way.
"""

import shlex
import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sat_tf import config as config_lib  # noqa: E402


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_lib.from_flags(flags.FLAGS, config_lib.EvalConfig)
    except ValueError as error:
        sys.exit(f"error: {error}")
    logging.set_verbosity(logging.WARNING)
    from sat_tf import evalrun

    try:
        evalrun.run(config, command=shlex.join(["python", *sys.argv]))
    except evalrun.EvalError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    config_lib.define_flags(flags.FLAGS, config_lib.EvalConfig)
    app.run(main)
