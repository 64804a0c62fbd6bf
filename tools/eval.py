"""Robustness evaluation of a trained classifier: clean, PGD-K over epsilons, optional AutoAttack.

    python tools/eval.py --model_dir=runs/demo/silu                  # the run's data and epsilon
    python tools/eval.py --model_path=m.keras --dataset=tfrecord:/data/validation-* \
        --image_size=224 --epsilons=4 --num_steps=10,20,50,200 --step_size=1
    python tools/eval.py --model_dir=runs/cifar10/wrn --protocol=robustbench --dataset=tfds:cifar10
    python tools/eval.py --model_dir=runs/imagenet/r50 --protocol=robustbench \
        --robustbench_ids=imagenet_test_image_ids.txt --dataset=tfrecord:/data/imagenet

The default protocol is the official SAT one: untargeted L-inf PGD, random start, K in
--num_steps, at each epsilon in pixels, with the run's evaluation step (--eval_step_size of its
config.json; 1 pixel for the paper's ImageNet rows, and 1 for a bare .keras file). Writes
results.json, results.md, summary.json and plots to --output_dir, and appends the evaluation to the
run's robustness card.

--protocol=robustbench (sat_tf.robustbench, docs/robustbench.md) fixes the attack (AutoAttack,
--autoattack_version), the epsilon (cifar10 8/255 = 8 pixels, imagenet 4/255 = 4 pixels) and the
examples (CIFAR-10: the first 10,000 test images; ImageNet: the 5,000 validation images named in
--robustbench_ids, from a tfrecord: or folder: copy of the validation set); --num_examples=N takes
the first N. Writes robustbench_<dataset>_Linf.json (a RobustBench model_info entry) to
--output_dir and appends the evaluation to the card.
"""

import json
import os
import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

flags.DEFINE_string("model_dir", None, "A finished training run (model.keras + config.json).")
flags.DEFINE_string("model_path", None, "Or: a .keras classifier file.")
flags.DEFINE_string("dataset", "", "Data spec (demo | tfrecord:<p> | tfds:<n> | folder:<d>).")
flags.DEFINE_string("eval_files", "", "TFRecord pattern for evaluation (overrides --dataset).")
flags.DEFINE_string("eval_split", "", "Split; default: the run's evaluation split.")
flags.DEFINE_string("data_dir", "", "TFDS data_dir.")
flags.DEFINE_integer("image_size", 0, "Resolution; default: the run's.")
flags.DEFINE_integer("num_examples", 0, "Evaluate the first N examples; 0: all.")
flags.DEFINE_list("epsilons", [], "L-inf radii in pixels; default: the run's evaluation epsilon.")
flags.DEFINE_float(
    "step_size", None, "PGD step in pixels; default: the run's --eval_step_size, else 1 (official)."
)
flags.DEFINE_list("num_steps", ["10", "20", "50"], "PGD steps K (official: 10,20,50,200).")
flags.DEFINE_integer("restarts", 1, "PGD random restarts (worst case over restarts).")
flags.DEFINE_list("attacks", [], "Extra attacks: apgd-ce, apgd-t, square, autoattack[-fast].")
flags.DEFINE_enum("protocol", "sat", ["sat", "robustbench"], "Evaluation protocol.")
flags.DEFINE_string("surrogate", "", "A .keras model for the transfer-attack masking check.")
flags.DEFINE_string("output_dir", "", "Where reports go; default: <model_dir>/eval.")
flags.DEFINE_integer("batch_size", 128, "Examples per attack call.")
flags.DEFINE_integer("seed", 0, "Seed of every attack.")
flags.DEFINE_enum(
    "autoattack_version",
    "standard",
    ["standard", "fast"],
    "robustbench: AutoAttack budget (fast: smoke runs, not a reportable number).",
)
flags.DEFINE_enum(
    "robustbench_dataset",
    None,
    ["cifar10", "imagenet"],
    "robustbench: the leaderboard; default: from the run's classes (10: cifar10, 1000: imagenet).",
)
flags.DEFINE_string(
    "robustbench_ids",
    "",
    "robustbench, imagenet: RobustBench's imagenet_test_image_ids.txt (see docs/robustbench.md).",
)
FLAGS = flags.FLAGS
# Flags that only one protocol reads: giving one to the other protocol is an error, not a no-op.
SAT_ONLY = ("epsilons", "step_size", "num_steps", "restarts", "attacks", "surrogate")
ROBUSTBENCH_ONLY = ("autoattack_version", "robustbench_dataset", "robustbench_ids")


def _fail(message):
    sys.exit(f"error: {message}")


def _resolve():
    """Model path, run config (or {}), output directory, from the flags; checks them first."""
    if bool(FLAGS.model_dir) == bool(FLAGS.model_path):
        _fail("give exactly one of --model_dir or --model_path.")
    model_dir = Path(FLAGS.model_dir) if FLAGS.model_dir else None
    path = model_dir / "model.keras" if model_dir else Path(FLAGS.model_path)
    if not path.is_file():
        _fail(f"{path} not found; train first (tools/train.py) or fix --model_dir/--model_path.")
    config_path = path.parent / "config.json"
    run = json.loads(config_path.read_text()) if config_path.exists() else {}
    output = Path(FLAGS.output_dir) if FLAGS.output_dir else path.parent / "eval"
    if FLAGS.step_size is not None and FLAGS.step_size <= 0:
        _fail(f"--step_size={FLAGS.step_size} must be > 0 (pixels).")
    if FLAGS.restarts < 1:
        _fail(f"--restarts={FLAGS.restarts} must be >= 1.")
    other = SAT_ONLY if FLAGS.protocol == "robustbench" else ROBUSTBENCH_ONLY
    given = [f"--{name}" for name in other if FLAGS[name].present]
    if given:
        _fail(f"{', '.join(given)} cannot be used with --protocol={FLAGS.protocol}.")
    return path, run, output


def _epsilons(run):
    try:
        values = [float(e) for e in FLAGS.epsilons]
    except ValueError:
        _fail(f"--epsilons={','.join(FLAGS.epsilons)} must be numbers (pixels).")
    if not values:
        eps = run.get("eval_epsilon", -1)
        values = [eps if eps is not None and eps >= 0 else run.get("epsilon", 4.0)]
    if any(e < 0 for e in values):
        _fail("--epsilons must be >= 0.")
    return values


def _data(run):
    from sat_tf import data

    spec = f"tfrecord:{FLAGS.eval_files}" if FLAGS.eval_files else FLAGS.dataset
    spec = spec or run.get("dataset")
    if not spec:
        _fail("--dataset (or --eval_files) is needed with a model that has no config.json.")
    image_size = FLAGS.image_size or run.get("image_size")
    if not image_size:
        _fail("--image_size is needed with a model that has no config.json.")
    split = (
        FLAGS.eval_split
        or run.get("eval_split")
        or ("test" if spec == "demo" or spec.startswith("tfds:cifar") else "validation")
    )
    try:
        return spec, data.load(
            spec,
            split=split,
            global_batch_size=FLAGS.batch_size,
            image_size=image_size,
            data_dir=FLAGS.data_dir or run.get("data_dir") or None,
            num_classes=run.get("num_classes"),
        ).dataset
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))


def _split(run, default):
    return FLAGS.eval_split or run.get("eval_split") or default


def _robustbench_imagenet(spec, n, image_size, run):
    """RobustBench's ImageNet subset (the first n of --robustbench_ids) from tfrecord:/folder:."""
    from sat_tf.data import robustbench as robustbench_data

    if not FLAGS.robustbench_ids:
        _fail(
            f"--robustbench_ids=<file> is needed for imagenet; download {robustbench_data.IDS_URL}"
        )
    ids, sha256 = robustbench_data.read_image_ids(FLAGS.robustbench_ids)
    split = _split(run, "validation")
    known = "" if sha256 == robustbench_data.IDS_SHA256 else ", not RobustBench's published list"
    source = f"{spec} split {split}: the first {min(n, len(ids))} of RobustBench's ids"
    source += f" (sha256 {sha256[:12]}{known})"
    scheme, _, target = spec.partition(":")
    if scheme == "folder":
        images, labels = robustbench_data.imagenet_from_folder(
            target, ids[:n], split=split, image_size=image_size
        )
    elif scheme == "tfrecord":
        pattern = target.replace("{split}", split)
        pattern = os.path.join(pattern, f"{split}-*") if os.path.isdir(pattern) else pattern
        images, labels = robustbench_data.imagenet_from_tfrecord(
            pattern, ids[:n], image_size=image_size
        )
    else:
        _fail(f"imagenet needs tfrecord:<pattern> or folder:<dir> data. Received: {spec}")
    return images, labels, source


def _robustbench_data(protocol, run):
    """`(images, labels, source)`: the protocol's first --num_examples examples, in its order."""
    from sat_tf import data, evaluation
    from sat_tf.data import robustbench as robustbench_data

    spec = f"tfrecord:{FLAGS.eval_files}" if FLAGS.eval_files else FLAGS.dataset
    spec = spec or run.get("dataset")
    if not spec:
        _fail("--dataset (or --eval_files) is needed with a model that has no config.json.")
    n = FLAGS.num_examples or protocol.num_examples
    image_size = FLAGS.image_size or run.get("image_size") or protocol.image_size
    if protocol.dataset == "imagenet":
        return _robustbench_imagenet(spec, n, image_size, run)
    if spec == "tfds:cifar10":
        images, labels = robustbench_data.cifar10_from_tfds(
            num_examples=n, data_dir=FLAGS.data_dir or run.get("data_dir") or None
        )
        return images, labels, "tfds:cifar10 test, original order (TFDS id)"
    split = _split(run, "test")
    loaded = data.load(
        spec,
        split=split,
        global_batch_size=FLAGS.batch_size,
        image_size=image_size,
        data_dir=FLAGS.data_dir or run.get("data_dir") or None,
        num_classes=run.get("num_classes"),
        is_training=False,
    )
    images, labels = evaluation.collect(loaded.dataset.take(-(-n // FLAGS.batch_size)), n)
    return images, labels, f"{spec} split {split}: the first {len(labels)} in the pipeline's order"


def _robustbench(model, path, run, output, command):
    from sat_tf import card, robustbench

    name = FLAGS.robustbench_dataset or {10: "cifar10", 1000: "imagenet"}.get(
        run.get("num_classes") or model.output_shape[-1]
    )
    if name is None:
        _fail(
            "--robustbench_dataset=cifar10|imagenet is needed: the model has neither 10 nor "
            "1000 classes."
        )
    protocol = robustbench.PROTOCOLS[name]
    if FLAGS.num_examples > protocol.num_examples:
        _fail(f"--num_examples={FLAGS.num_examples}: {name} has {protocol.num_examples}.")
    try:
        images, labels, source = _robustbench_data(protocol, run)
        architecture = f"{run['model']} ({run['activation']})" if run else model.name
        result = robustbench.evaluate(
            model,
            images,
            labels,
            dataset=name,
            num_examples=min(FLAGS.num_examples or protocol.num_examples, len(labels)),
            version=FLAGS.autoattack_version,
            batch_size=FLAGS.batch_size,
            seed=FLAGS.seed,
            model_info={"architecture": architecture},
            source=source,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        _fail(str(error))
    output.mkdir(parents=True, exist_ok=True)
    target = output / f"robustbench_{name}_Linf.json"
    target.write_text(json.dumps(result.model_info_entry(), indent=2) + "\n")
    card.add_evaluation(path.parent, result.card_entry(command))
    print(
        f"RobustBench {name} Linf {protocol.epsilon} ({protocol.epsilon_pixels:g} pixels), "
        f"AutoAttack {result.version}, {result.num_examples} examples: clean "
        f"{100 * result.clean_accuracy:.2f}%, AutoAttack {100 * result.robust_accuracy:.2f}%"
    )
    for deviation in result.deviations:
        print(f"  differs from RobustBench: {deviation}")
    print(f"Entry: {target}; card: {path.parent / card.CARD_NAME}")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    path, run, output = _resolve()
    from sat_tf import card, evaluation, saving

    try:  # checks the archive first, always safe_mode=True
        model = saving.load_model(path)
        surrogate = saving.load_model(FLAGS.surrogate) if FLAGS.surrogate else None
    except saving.ModelFileError as error:
        _fail(str(error))
    command = " ".join(sys.argv)
    if FLAGS.protocol == "robustbench":
        _robustbench(model, path, run, output, command)
        return
    epsilons = _epsilons(run)
    step_size = FLAGS.step_size if FLAGS.step_size is not None else run.get("eval_step_size", 1.0)
    spec, dataset = _data(run)
    attacks = (
        ["clean"]
        + [
            f"pgd-{k}x{FLAGS.restarts}" if FLAGS.restarts > 1 else f"pgd-{k}"
            for k in FLAGS.num_steps
        ]
        + list(FLAGS.attacks)
    )
    results = evaluation.evaluate(
        model,
        dataset,
        attacks=attacks,
        epsilons=epsilons,
        num_examples=FLAGS.num_examples or None,
        batch_size=FLAGS.batch_size,
        seed=FLAGS.seed,
        surrogate=surrogate,
        pgd_step_size=step_size,
    )
    output.mkdir(parents=True, exist_ok=True)
    results.save(output)
    primary = epsilons[0]
    summary = {"clean": results.clean_accuracy, "epsilon": primary}
    summary |= {a: results.accuracy(a, primary) for a in attacks if a != "clean"}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    entry = card.evaluation_entry(
        results, protocol="sat", command=command, dataset=spec, step_size=step_size
    )
    card.add_evaluation(path.parent, entry)
    print((output / "results.md").read_text())
    print(f"Reports in {output}; card: {path.parent / card.CARD_NAME}")


if __name__ == "__main__":
    app.run(main)
