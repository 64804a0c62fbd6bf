"""The schema of an evaluation: an attack spec, its parser, and one row of results.

`sat_tf.evaluation` writes `Row`s; `sat_tf.masking`, `sat_tf.reporting`, `sat_tf.card`,
`sat_tf.robustbench` and the study read them. This module imports nothing from sat_tf, so every
one of them can import it without a cycle.

Attack specs are strings `name[-budget][xrestarts]` or `AttackSpec`s:
    "clean"                  no attack.
    "fgsm"                   one signed-gradient step of size epsilon.
    "pgd-K", "pgd-KxR"       PGD, K steps of 2.5 * epsilon / K (Madry et al. 2018), random start;
                             R restarts, an example counts as robust only if it survives all R.
    "apgd-ce[-K]"            APGD on cross-entropy, K steps (default 100).
    "apgd-t[-K]"             APGD on the targeted DLR loss, 9 target classes, K steps (default 100).
    "square[-Q]"             Square Attack, Q queries (default 5000).
    "autoattack[-fast|-rand]" the AutoAttack ensemble, "standard" (default), "fast", or "rand" (for
                             randomized models: APGD-CE and APGD-DLR with EOT).
"""

import dataclasses
import re

_PATTERN = re.compile(
    r"^(clean|fgsm|pgd|apgd-ce|apgd-t|square|autoattack)(?:-(\d+|fast|standard|rand))?(?:x(\d+))?$"
)
_DEFAULT_BUDGET = {"pgd": 10, "apgd-ce": 100, "apgd-t": 100, "square": 5000}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack of the table.

    Attributes:
        kind: "clean", "fgsm", "pgd", "apgd-ce", "apgd-t", "square", "autoattack" or "transfer".
        num_steps: Steps (PGD, APGD) or queries (Square); None where it does not apply.
        num_restarts: Random restarts (PGD, APGD).
        version: AutoAttack version, "standard" or "fast".
        step_size: PGD step in pixels; None for Madry's 2.5 * epsilon / num_steps.
    """

    kind: str
    num_steps: int | None = None
    num_restarts: int = 1
    version: str = "standard"
    step_size: float | None = None

    @property
    def label(self):
        if self.kind == "autoattack":
            return "autoattack" if self.version == "standard" else f"autoattack-{self.version}"
        budget = f"-{self.num_steps}" if self.num_steps is not None else ""
        restarts = f"x{self.num_restarts}" if self.num_restarts > 1 else ""
        return f"{self.kind}{budget}{restarts}"


def parse_attack(spec):
    """An `AttackSpec` from a string such as "pgd-50x3" (or an `AttackSpec`, returned as is)."""
    if isinstance(spec, AttackSpec):
        return spec
    match = _PATTERN.match(str(spec).strip().lower())
    if not match:
        raise ValueError(f"Unknown attack spec. Received: {spec!r}; see sat_tf.rows's docstring.")
    kind, budget, restarts = match.groups()
    if kind == "autoattack":
        return AttackSpec("autoattack", version=budget or "standard")
    if budget is not None and not budget.isdigit():
        raise ValueError(f"Only autoattack takes a version. Received: {spec!r}")
    steps = int(budget) if budget else _DEFAULT_BUDGET.get(kind)
    return AttackSpec(kind, steps, int(restarts or 1))


@dataclasses.dataclass(frozen=True)
class Row:
    """The accuracy under one attack at one epsilon.

    Attributes:
        attack: The spec's label, e.g. "pgd-50x2".
        kind: The spec's kind ("clean", "pgd", "apgd-ce", "square", "transfer", ...).
        epsilon: L-inf radius in pixels (0 for "clean").
        accuracy: Fraction of the examples still classified correctly.
        num_steps: Steps or queries; None where it does not apply.
        num_restarts: Random restarts.
        step_size: PGD step in pixels; None for the attack's default.
        seconds: Wall time of the attack.
    """

    attack: str
    kind: str
    epsilon: float
    accuracy: float
    num_steps: int | None = None
    num_restarts: int = 1
    step_size: float | None = None
    seconds: float = 0.0

    # The JSON key order of the files already written (results.json, cards, the study).
    KEYS = ("attack", "kind", "epsilon", "num_steps", "num_restarts", "step_size", "accuracy")

    def to_dict(self, keys=KEYS + ("seconds",)):
        """The row as JSON-ready dict with `keys`, in that order."""
        return {key: getattr(self, key) for key in keys}

    @classmethod
    def from_dict(cls, values):
        """A row from `to_dict`'s output (missing optional keys take their defaults)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})
