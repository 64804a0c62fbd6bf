"""The schema of an evaluation: an attack spec and one row of results.

`sat_tf.jobs` parses and runs specs; `sat_tf.evaluation` writes `Row`s; `sat_tf.masking`,
`sat_tf.reporting`, `sat_tf.card`, `sat_tf.robustbench` and the study read them. This module
imports nothing from sat_tf, so every one of them can import it without a cycle.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation (the names and the string form: `sat_tf.jobs`).

    Attributes:
        kind: A name of `sat_tf.jobs.ATTACKS` ("pgd", "apgd-t", "square", "autoattack", ...).
        num_steps: Steps (FGSM/PGD/APGD/FAB); None where it does not apply.
        num_queries: Queries (Square); None where it does not apply.
        num_restarts: Random restarts (PGD, APGD).
        version: AutoAttack version, "standard", "fast" or "rand".
        step_size: PGD step in pixels; None for Madry's 2.5 * epsilon / num_steps.
        eot_iter: Gradients averaged per APGD step (AutoAttack "rand").
        stages: AutoAttack stages to run (names of `sat_tf.jobs.STAGES`); None: the version's.
    """

    kind: str
    num_steps: int | None = None
    num_restarts: int = 1
    version: str = "standard"
    step_size: float | None = None
    num_queries: int | None = None
    eot_iter: int = 1
    stages: tuple | None = None

    @property
    def label(self):
        if self.kind == "autoattack":
            return "autoattack" if self.version == "standard" else f"autoattack-{self.version}"
        budget = self.num_queries if self.num_queries is not None else self.num_steps
        budget = f"-{budget}" if budget is not None else ""
        restarts = f"x{self.num_restarts}" if self.num_restarts > 1 else ""
        return f"{self.kind}{budget}{restarts}"


@dataclasses.dataclass(frozen=True)
class Row:
    """The accuracy under one attack at one epsilon.

    Attributes:
        attack: The spec's label, e.g. "pgd-50x2".
        kind: The spec's kind ("clean", "pgd", "apgd-ce", "square", "transfer", ...).
        epsilon: L-inf radius in pixels (0 for "clean").
        accuracy: Fraction of the examples still classified correctly.
        num_steps: Steps; None where it does not apply.
        num_restarts: Random restarts.
        step_size: PGD step in pixels; None for the attack's default.
        seconds: Wall time of the attack.
        num_queries: Queries (Square); None where it does not apply.
    """

    attack: str
    kind: str
    epsilon: float
    accuracy: float
    num_steps: int | None = None
    num_restarts: int = 1
    step_size: float | None = None
    seconds: float = 0.0
    num_queries: int | None = None

    # The JSON key order of results.json, cards and the study's result files.
    KEYS = (
        "attack",
        "kind",
        "epsilon",
        "num_steps",
        "num_queries",
        "num_restarts",
        "step_size",
        "accuracy",
    )

    def to_dict(self, keys=KEYS + ("seconds",)):
        """The row as JSON-ready dict with `keys`, in that order."""
        return {key: getattr(self, key) for key in keys}

    @classmethod
    def from_dict(cls, values):
        """A row from `to_dict`'s output (missing optional keys take their defaults; a Square
        row without "num_queries", as sat_tf 0.1.0 wrote it, has its queries in "num_steps")."""
        names = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in values.items() if key in names}
        if values.get("kind") == "square" and "num_queries" not in values:
            values["num_queries"] = values.pop("num_steps", None)
        return cls(**values)
