"""The CPU-scale SAT study: every activation row x seeds, trained and evaluated alike.

`python tools/study.py --help` is the command line (docs/study.md: the protocol and results). This
is the repository's own research, not library code: it lives beside `sat_tf/`, is not installed,
and uses sat_tf as any user would (sat_tf never imports it). The package, one job a module:

    protocol.py   the rows, seeds, arms and the fixed evaluation protocol (`EVAL`), and
                  `evaluate_model`, the protocol run on one model
    paths.py      where results, the cache and the CIFAR-10 copy live (environment variables)
    jobs.py       the queue of (row, seed) runs: pending, claims between queues, child processes
    arrays.py     the test split in the protocol's order, extracted and cached once
    runs.py       one run: its config from the row's flagfile, train, evaluate, write the record
    report.py     docs/study.md's generated sections and plots

Rows are the flagfiles `configs/study/<row>.cfg` (each also runs alone with tools/train.py). A run
is finished when `results/study/<row>_s<seed>.json` exists with the current protocol, and is
skipped; a killed run resumes from the checkpoints of `training.run` in
`<cache>/runs/<row>_s<seed>` (outside the repository).
"""

from study.arrays import ensure_data, eval_arrays
from study.jobs import (
    claim,
    is_current,
    next_utc_time,
    pending,
    queue,
    result_path,
    run_queue,
)
from study.paths import ROOT
from study.protocol import (
    ARMS,
    CIFAR10,
    EVAL,
    EVAL_DIGITS,
    ROWS,
    SEEDS,
    STANDARD_AA,
    SUMMARY,
    Arm,
    evaluate_model,
)
from study.runs import load_config, run_one, run_standard_autoattack

__all__ = [
    "ARMS",
    "CIFAR10",
    "EVAL",
    "EVAL_DIGITS",
    "ROOT",
    "ROWS",
    "SEEDS",
    "STANDARD_AA",
    "SUMMARY",
    "Arm",
    "claim",
    "ensure_data",
    "eval_arrays",
    "evaluate_model",
    "is_current",
    "load_config",
    "pending",
    "queue",
    "result_path",
    "run_one",
    "run_queue",
    "run_standard_autoattack",
    "next_utc_time",
]
