"""The CPU-scale SAT study (docs/study.md): activation rows x seeds, trained and evaluated alike.

    python tools/study.py --run                 # the queue, seed-major; resumes; ~8 min a run
    python tools/study.py --run --seeds=0 --rows=relu,silu
    python tools/study.py --run --arm=digits    # the same rows on the built-in digits
    python tools/study.py --report [--arm=digits]   # docs/study.md + docs/study_*.png
    python tools/study.py --run --autoattack_standard --rows=relu,silu   # the AutoAttack check

The study itself is the `study/` package beside `sat_tf/` (rows, protocol, jobs, runs, report;
not installed, it is this repository's research, not library code); this file parses the command
line. Several `--run` queues may run at once; they split the runs between them.
`--autoattack_standard` queues another pass over finished runs: standard AutoAttack on the same
subset, from the saved model, into `results/study/autoattack_standard/` (the protocol's own
AutoAttack is the fast version, which only bounds standard AutoAttack from above).
Environment: SAT_TF_STUDY_RESULTS (results folder), SAT_TF_CACHE (runs, claims, test arrays),
SAT_TF_CIFAR10_TARBALL (the CIFAR-10 JPEG copy to extract), SAT_TF_STUDY_COMMIT (recorded code).
"""

import argparse
import sys
from pathlib import Path

# The repository root, for `study` (never installed) and for sat_tf when it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study import jobs, paths, report, runs  # noqa: E402
from study.protocol import ARMS, ROWS, SEEDS, STANDARD_AA  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="store_true", help="run the pending queue")
    parser.add_argument("--report", action="store_true", help="write docs/study.md and plots")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma list of rows")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma list")
    parser.add_argument("--stop_at", default="", help="UTC HH:MM: start no run after it")
    parser.add_argument("--arm", default="cifar10", choices=sorted(ARMS), help="the dataset")
    parser.add_argument("--results", default=str(paths.RESULTS), help="folder of the result files")
    parser.add_argument(
        "--autoattack_standard",
        action="store_true",
        help=f"with --run: standard AutoAttack on finished runs (results/study/{STANDARD_AA})",
    )
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # row:seed, child process
    args = parser.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if not (args.one or args.run or args.report):
        parser.print_help()
    return args


def main(argv=None):
    args = parse_args(argv)
    arm = ARMS[args.arm]
    if args.one:
        row, seed = args.one.split(":")
        one = runs.run_standard_autoattack if args.autoattack_standard else runs.run_one
        one(row, int(seed), args.results, arm)
    elif args.run:
        stop_at = jobs.next_utc_time(args.stop_at) if args.stop_at else None
        jobs.run_queue(
            args.rows,
            args.seeds,
            results=args.results,
            stop_at=stop_at,
            arm=arm,
            standard_aa=args.autoattack_standard,
        )
    if args.report:
        folder = Path(args.results) / arm.folder
        version = arm.protocol["version"]
        report.write_report(
            report.load_results(folder, version=version),
            paths.ROOT / "docs",
            rows=args.rows,
            seeds=args.seeds,
            standard=report.load_results(folder / STANDARD_AA, version=version),
            protocol=arm.protocol,
            arm=arm.name,
            data=arm.data,
        )


if __name__ == "__main__":
    main()
