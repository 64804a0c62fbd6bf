"""Results of `sat_tf.evaluation.evaluate`: JSON, a Markdown table and two plots."""

import dataclasses
import json
import pathlib

import matplotlib
import numpy as np

matplotlib.use("Agg")  # No display on servers and CI; set before pyplot is imported.
import matplotlib.pyplot as plt  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PerExample:
    """What every attack found on every example (`sat_tf.passes`).

    Attributes:
        labels: [N] int classes.
        fooled_by: [jobs, N] int: per attack (a row of the table, same order), the index in
            `passes` of the pass that fooled the example (0: misclassified clean), -1 where none.
        jobs: The attacks' labels, e.g. "pgd-20 eps=4".
        passes: Per attack, its passes' names ("clean", "restart", "apgd-t", ...).
    """

    labels: np.ndarray
    fooled_by: np.ndarray
    jobs: list
    passes: list

    def save(self, path):
        """Writes an `.npz` with labels, fooled_by, jobs and passes (JSON text)."""
        np.savez_compressed(
            path,
            labels=self.labels,
            fooled_by=self.fooled_by,
            jobs=np.array(self.jobs),
            passes=np.array(json.dumps(self.passes)),
        )


@dataclasses.dataclass
class EvaluationResults:
    """What `evaluate` measured.

    Attributes:
        rows: One `sat_tf.rows.Row` per (attack, epsilon); the first row is the clean
            accuracy (epsilon 0).
        worst_case: Epsilon -> accuracy under the per-example worst case over all attacks.
        checks: `sat_tf.masking.Check`s.
        num_examples: Number of evaluated examples.
        per_example: A `PerExample`, or None.
        evaluation_id: `sat_tf.evalstate.EvaluationState.evaluation_id` of a resumable
            evaluation, or None.
    """

    rows: list
    worst_case: dict
    checks: list
    num_examples: int
    per_example: PerExample | None = None
    evaluation_id: str | None = None

    @property
    def clean_accuracy(self):
        return next(r.accuracy for r in self.rows if r.kind == "clean")

    def accuracy(self, attack, epsilon):
        """Accuracy at `epsilon` of an attack, by label ("apgd-ce-100", any case) or by name
        ("apgd-ce") when one row of that name is at that epsilon."""
        name = str(attack).strip().lower()
        found = [r for r in self.rows if r.epsilon == float(epsilon)]
        found = [r for r in found if r.attack == name] or [r for r in found if r.kind == name]
        if len(found) != 1:
            raise KeyError(f"No single row for attack={attack!r}, epsilon={epsilon!r}")
        return found[0].accuracy

    def to_dict(self):
        return {
            "num_examples": self.num_examples,
            "clean_accuracy": self.clean_accuracy,
            "rows": [row.to_dict() for row in self.rows],
            "worst_case": {str(k): v for k, v in self.worst_case.items()},
            "checks": [
                {"name": c.name, "status": c.status, "message": c.message, "values": c.values}
                for c in self.checks
            ],
        }

    def to_json(self, path):
        pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=float) + "\n")

    def to_markdown(self):
        """A table (attacks x epsilons, accuracy in %), the worst case, then the checks."""
        epsilons = sorted({r.epsilon for r in self.rows if r.kind != "clean"})
        attacks = list(dict.fromkeys(r.attack for r in self.rows if r.kind != "clean"))
        cells = {(r.attack, r.epsilon): r.accuracy for r in self.rows}
        head = "| attack | " + " | ".join(f"eps={e:g}" for e in epsilons) + " |"
        lines = [
            f"Accuracy (%) on {self.num_examples} examples; L-inf epsilon in pixels (0-255). "
            f"Clean: {100 * self.clean_accuracy:.2f}%.",
            "",
            head,
            "|---" * (len(epsilons) + 1) + "|",
        ]
        for attack in attacks + ["worst case"]:
            values = [
                self.worst_case.get(e) if attack == "worst case" else cells.get((attack, e))
                for e in epsilons
            ]
            text = ["-" if v is None else f"{100 * v:.2f}" for v in values]
            lines.append(f"| {attack} | " + " | ".join(text) + " |")
        if self.checks:
            lines += ["", "Gradient-masking checks:", ""]
            lines += [f"- **{c.status}** {c.name}: {c.message}" for c in self.checks]
        return "\n".join(lines) + "\n"

    def plot_accuracy_vs_epsilon(self, path):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for attack in dict.fromkeys(r.attack for r in self.rows if r.kind != "clean"):
            series = sorted((r.epsilon, r.accuracy) for r in self.rows if r.attack == attack)
            ax.plot(
                *zip(*[(0.0, self.clean_accuracy)] + series, strict=True), marker="o", label=attack
            )
        ax.set(xlabel="epsilon (pixels, 0-255)", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def plot_accuracy_vs_steps(self, path):
        """PGD accuracy against the number of steps, one line per (epsilon, restarts)."""
        fig, ax = plt.subplots(figsize=(5, 3.5))
        pgd = [r for r in self.rows if r.kind == "pgd"]
        for eps, restarts in sorted({(r.epsilon, r.num_restarts) for r in pgd}):
            series = sorted(
                (r.num_steps, r.accuracy)
                for r in pgd
                if r.epsilon == eps and r.num_restarts == restarts
            )
            label = f"eps={eps:g}" + (f", {restarts} restarts" if restarts > 1 else "")
            ax.plot(*zip(*series, strict=True), marker="o", label=label)
        ax.set(xlabel="PGD steps", ylabel="accuracy", ylim=(-0.02, 1.02))
        if pgd:
            ax.set_xscale("log")
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def save(self, directory):
        """Writes results.json, results.md, the two PNG plots and per_example.npz (when there
        are per-example records); returns their paths."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": directory / "results.json",
            "markdown": directory / "results.md",
            "accuracy_vs_epsilon": directory / "accuracy_vs_epsilon.png",
            "accuracy_vs_steps": directory / "accuracy_vs_steps.png",
        }
        self.to_json(paths["json"])
        paths["markdown"].write_text(self.to_markdown())
        self.plot_accuracy_vs_epsilon(paths["accuracy_vs_epsilon"])
        self.plot_accuracy_vs_steps(paths["accuracy_vs_steps"])
        if self.per_example is not None:
            paths["per_example"] = directory / "per_example.npz"
            self.per_example.save(paths["per_example"])
        return paths
