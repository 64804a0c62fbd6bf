"""Robustness evaluation of a trained classifier: clean, PGD-K over epsilons, optional AutoAttack.

    python tools/eval.py --model_dir=runs/demo/silu                  # the run's data and epsilon
    python tools/eval.py --model_path=m.keras --dataset=tfrecord:/data/validation-* \
        --image_size=224 --epsilons=4 --num_steps=10,20,50,200 --step_size=1
    python tools/eval.py --model_dir=... --protocol=robustbench       # see sat_tf.robustbench

The default protocol is the official SAT one: untargeted L-inf PGD, step 1 pixel, random start,
K in --num_steps, at each epsilon in pixels. Writes results.json, results.md, summary.json and
plots to --output_dir, and appends the evaluation to the run's robustness card.
"""

import json
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
flags.DEFINE_float("step_size", 1.0, "PGD step in pixels (official protocol: 1).")
flags.DEFINE_list("num_steps", ["10", "20", "50"], "PGD steps K (official: 10,20,50,200).")
flags.DEFINE_integer("restarts", 1, "PGD random restarts (worst case over restarts).")
flags.DEFINE_list("attacks", [], "Extra attacks: apgd-ce, apgd-t, square, autoattack[-fast].")
flags.DEFINE_enum("protocol", "sat", ["sat", "robustbench"], "Evaluation protocol.")
flags.DEFINE_string("surrogate", "", "A .keras model for the transfer-attack masking check.")
flags.DEFINE_string("output_dir", "", "Where reports go; default: <model_dir>/eval.")
flags.DEFINE_integer("batch_size", 128, "Examples per attack call.")
flags.DEFINE_integer("seed", 0, "Seed of every attack.")
FLAGS = flags.FLAGS


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
    if FLAGS.step_size <= 0:
        _fail(f"--step_size={FLAGS.step_size} must be > 0 (pixels).")
    if FLAGS.restarts < 1:
        _fail(f"--restarts={FLAGS.restarts} must be >= 1.")
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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    path, run, output = _resolve()
    import keras

    from sat_tf import card, evaluation

    model = keras.saving.load_model(path, safe_mode=True)
    command = " ".join(sys.argv)
    if FLAGS.protocol == "robustbench":
        from sat_tf import robustbench

        result = robustbench.run(model, run, FLAGS, output)
        card.add_evaluation(path.parent, result["card_entry"] | {"command": command})
        return
    epsilons = _epsilons(run)
    spec, dataset = _data(run)
    attacks = (
        ["clean"]
        + [
            f"pgd-{k}x{FLAGS.restarts}" if FLAGS.restarts > 1 else f"pgd-{k}"
            for k in FLAGS.num_steps
        ]
        + list(FLAGS.attacks)
    )
    surrogate = (
        keras.saving.load_model(FLAGS.surrogate, safe_mode=True) if FLAGS.surrogate else None
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
        pgd_step_size=FLAGS.step_size,
    )
    output.mkdir(parents=True, exist_ok=True)
    results.save(output)
    primary = epsilons[0]
    summary = {"clean": results.clean_accuracy, "epsilon": primary}
    summary |= {a: results.accuracy(a, primary) for a in attacks if a != "clean"}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    entry = card.evaluation_entry(
        results, protocol="sat", command=command, dataset=spec, step_size=FLAGS.step_size
    )
    card.add_evaluation(path.parent, entry)
    print((output / "results.md").read_text())
    print(f"Reports in {output}; card: {path.parent / card.CARD_NAME}")


if __name__ == "__main__":
    app.run(main)
