"""The README's main job: a ReLU model and its SAT twin on the built-in digits data, side by side.

    python tools/demo.py [--activations=relu,silu] [--runs_dir=runs/demo]

Trains each activation with `tools/train.py --flagfile=configs/demo.cfg` (PGD adversarial
training), evaluates clean and PGD-K accuracy with `tools/eval.py`, and prints one table. Runs that
already finished are reused; pass --retrain to train them again.
"""

import json
import subprocess
import sys
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

flags.DEFINE_list("activations", ["relu", "silu"], "Activations to compare.")
flags.DEFINE_string("runs_dir", "runs/demo", "Where the runs go (one sub-directory each).")
flags.DEFINE_string("flagfile_path", "configs/demo.cfg", "The training recipe.")
flags.DEFINE_list("eval_num_steps", ["10", "20"], "PGD steps for the evaluation table.")
flags.DEFINE_bool("retrain", False, "Train again even where a finished run exists.")
flags.DEFINE_bool(
    "deterministic", False, "Train and evaluate with --deterministic: the same table every run."
)
FLAGS = flags.FLAGS


def _run(args):
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main(argv):
    del argv
    rows = []
    for activation in FLAGS.activations:
        model_dir = Path(FLAGS.runs_dir) / activation
        if FLAGS.retrain or not (ROOT / model_dir / "model.keras").exists():
            _run(
                [
                    "tools/train.py",
                    f"--flagfile={FLAGS.flagfile_path}",
                    f"--activation={activation}",
                    f"--model_dir={model_dir}",
                    "--overwrite",
                    *(["--deterministic"] if FLAGS.deterministic else []),
                ]
            )
        report = ROOT / model_dir / "eval"
        _run(
            [
                "tools/eval.py",
                f"--model_dir={model_dir}",
                f"--output_dir={report}",
                f"--num_steps={','.join(FLAGS.eval_num_steps)}",
                *(["--deterministic"] if FLAGS.deterministic else []),
            ]
        )
        rows.append((activation, json.loads((report / "summary.json").read_text()), model_dir))
    print(_table(rows))


def _table(rows):
    steps = [int(k) for k in FLAGS.eval_num_steps]
    header = "| activation | clean | " + " | ".join(f"PGD-{k}" for k in steps) + " | model |"
    lines = [header, "|" + "---|" * (len(steps) + 3)]
    for activation, accuracies, model_dir in rows:
        cells = [f"{100 * accuracies['clean']:.1f}%"]
        cells += [f"{100 * accuracies[f'pgd-{k}']:.1f}%" for k in steps]
        lines.append(f"| {activation} | " + " | ".join(cells) + f" | {model_dir}/model.keras |")
    lines.append(f"TensorBoard logs: tensorboard --logdir {FLAGS.runs_dir}")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
