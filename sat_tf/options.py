"""The allowed values of a run's settings, and the rules that resolve a setting left unset.

One low module that imports nothing from sat_tf, so the configuration (`sat_tf.config`) and the
modules that use each value (`sat_tf.training`, `sat_tf.schedules`, `sat_tf.distribute`,
`sat_tf.adversarial`, the evaluation) read the same tuple and the same rule.
"""

OPTIMIZERS = ("sgd", "rmsprop")  # sat_tf.training.build_optimizer
SCHEDULES = ("step", "exponential", "cosine")  # sat_tf.schedules.WarmupDecay's kinds
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")  # sat_tf.distribute.get_strategy
MIXED_PRECISION = ("", "float16", "bfloat16")  # "" is float32
# The phases in which SmoothGradReLU uses its smooth backward pass (the paper's ablation): the
# attacker's input gradient and the weight update.
SMOOTH_PHASES = ("attack", "update")
# Random restarts of one attack: each is a pass over the examples (`sat_tf.passes`), numbered in
# an int16 per-example record; far more than any evaluation protocol uses (PGD-50 x 10 at most).
MAX_RESTARTS = 1000


def eval_epsilon(epsilon, eval_epsilon):
    """The evaluation attack's radius: `eval_epsilon`, or the training `epsilon` when it is None
    (the official code evaluates at the training epsilon)."""
    return float(epsilon if eval_epsilon is None else eval_epsilon)


def default_eval_split(spec):
    """The evaluation split of a data spec: "test" for demo and tfds:cifar*, else "validation"
    (ImageNet's held-out split)."""
    return "test" if spec == "demo" or spec.startswith("tfds:cifar") else "validation"
