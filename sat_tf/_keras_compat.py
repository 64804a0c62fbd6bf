"""Every use of Keras internals in sat_tf, in one place.

Keras has no public API for these; each is checked on the Keras versions in `CHECKED_VERSIONS`
(tests/test_house.py fails on any other, and pyproject.toml allows only those). These internals
differ between minor releases (`CompileMetrics` differs between 3.14 and 3.15), so a new Keras
release means re-reading these against its source before widening the range.

    - `CompileMetrics` (keras/src/trainers/compile_utils.py): resolves "accuracy" etc. from the
      label and output shapes. `AdversarialModel` keeps a second instance for adversarial
      predictions, built from the compiled one's `_user_metrics` / `_user_weighted_metrics`.
    - `Trainer._compile_metrics`, `Trainer._compute_loss`, `Trainer._loss_tracker`: the compiled
      metrics, the loss computation Keras's own `train_step` calls, and the `loss` tracker.
    - `Trainer._symbolic_build`: creates metric and optimizer variables before the first step,
      outside any replica context, as `fit` does.
    - `Layer._flatten_layers`: every nested layer, also those held in attributes of custom layers.
    - `tracking.no_automatic_dependency_tracking`: keeps `compile` from tracking the twin metrics
      as weights of the model (they are tracked through `metrics`).
"""

from keras.src.trainers.compile_utils import CompileMetrics
from keras.src.utils.tracking import no_automatic_dependency_tracking

CHECKED_VERSIONS = ("3.15.1",)

__all__ = [
    "CHECKED_VERSIONS",
    "PrefixedCompileMetrics",
    "compiled_metrics",
    "compute_loss",
    "flatten_layers",
    "loss_tracker",
    "metrics_twin",
    "no_automatic_dependency_tracking",
    "symbolic_build",
]


class PrefixedCompileMetrics(CompileMetrics):
    """Compiled metrics whose result names get `prefix` (e.g. "adv_accuracy")."""

    def __init__(self, *args, prefix, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix = prefix

    def result(self):
        return {f"{self.prefix}{name}": value for name, value in super().result().items()}


def compiled_metrics(model):
    """The model's compiled metrics (a `CompileMetrics`), or None before `compile`."""
    return model._compile_metrics


def metrics_twin(model, clone, prefix):
    """A second `CompileMetrics` with the model's compiled metrics, names prefixed; or None.

    `clone` maps each user metric (a name or a `keras.metrics.Metric`) to the twin's copy.
    """
    import keras

    clean = compiled_metrics(model)
    if clean is None:
        return None
    return PrefixedCompileMetrics(
        keras.tree.map_structure(clone, clean._user_metrics),
        keras.tree.map_structure(clone, clean._user_weighted_metrics),
        output_names=clean.output_names,
        prefix=prefix,
    )


def compute_loss(model, **kwargs):
    """The loss as Keras's own `train_step` computes it (`Trainer._compute_loss`)."""
    return model._compute_loss(**kwargs)


def loss_tracker(model):
    """The `Mean` metric behind the `loss` log."""
    return model._loss_tracker


def symbolic_build(model, data_batch):
    """Creates the model's metric and optimizer variables from a batch spec, as `fit` does."""
    model._symbolic_build(data_batch=data_batch)


def flatten_layers(model, include_self=False):
    """Every layer nested in `model` (recursively, also inside custom layers), as a list."""
    return list(model._flatten_layers(include_self=include_self))
