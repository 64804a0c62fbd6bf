"""RobustBench-compatible L-inf evaluation: the protocol and its result file (its data:
`sat_tf.data.robustbench_data`).

RobustBench (Croce et al., "RobustBench: a standardized adversarial robustness benchmark",
NeurIPS 2021 Datasets and Benchmarks; github.com/RobustBench/robustbench, `benchmark()` in
robustbench/eval.py) evaluates an L-inf model as follows:
    cifar10:  the first 10,000 CIFAR-10 test images, in the order of the original test batch
              (torchvision's order), epsilon 8/255.
    imagenet: the fixed 5,000 ImageNet validation images named in RobustBench's
              robustbench/helper_files/imagenet_test_image_ids.txt, in that order, resized to 256
              and centre-cropped to 224 ("Res256Crop224"), epsilon 4/255.
    Both: AutoAttack "standard"; clean and AutoAttack accuracy reported in percent.

Units. RobustBench models take [0, 1] inputs; ours take [0, 255] pixels (normalisation inside the
model). An image x01 is x = 255 * x01 here, and the L-inf ball of radius eps01 around x01 is the
ball of radius 255 * eps01 around x: epsilon 8/255 == 8 pixels, 4/255 == 4 pixels (`to_pixels`).
`unit_interval_model` wraps one of our models for RobustBench's [0, 1] convention.

Where this differs from RobustBench's own run (every result lists what applies in `deviations`):
    - AutoAttack is sat_tf.autoattack (Keras, on the backend Keras runs), not the reference
      PyTorch code: the same stages (APGD-CE, APGD-T, FAB-T, Square) and settings, but other
      random draws; on one CIFAR-10 CNN it agreed with the reference code (docs/robustbench.md,
      "Agreement with the reference").
    - ImageNet: our evaluation crop (the central 224/256 of the shorter side, then a TF bilinear
      resize) covers the same region as torchvision's Resize(256) + CenterCrop(224) but resamples
      differently (PIL antialiased bilinear before the crop), so pixels differ slightly.
"""

import dataclasses

import keras
import numpy as np

from sat_tf import autoattack, backend, jobs, reporting
from sat_tf.examples import CHUNK_BATCHES, Examples
from sat_tf.rows import Row


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One RobustBench L-inf leaderboard.

    Attributes:
        leaderboard: RobustBench's name of the dataset, "cifar10" or "imagenet".
        epsilon: RobustBench's "eps" field: the radius as a fraction of the [0, 1] range.
        num_examples: examples of the full protocol.
        image_size: input side of RobustBench's default preprocessing.
        num_classes: classes of the dataset.
    """

    leaderboard: str
    epsilon: str
    num_examples: int
    image_size: int
    num_classes: int

    @property
    def epsilon_pixels(self):
        return to_pixels(self.epsilon)


PROTOCOLS = {
    "cifar10": Protocol("cifar10", "8/255", 10_000, 32, 10),
    "imagenet": Protocol("imagenet", "4/255", 5_000, 224, 1000),
}


def to_pixels(epsilon):
    """An L-inf radius in RobustBench's [0, 1] units ("8/255" or 8 / 255) in our pixel units."""
    if isinstance(epsilon, str):
        numerator, _, denominator = epsilon.partition("/")
        return float(numerator) * 255.0 / float(denominator or 1)  # "8/255" -> exactly 8.0
    return round(float(epsilon) * 255.0, 9)


def unit_interval_model(model, name=None):
    """`model` (inputs in [0, 255]) as a model taking RobustBench's [0, 1] inputs.

    A built-in `Rescaling(255)` layer in front (no Lambda), so the wrapper saves as `.keras` and
    loads with `safe_mode=True`. Its outputs on x01 equal `model`'s on 255 * x01.
    """
    inputs = keras.Input(shape=model.input_shape[1:], name="images_0_1")
    pixels = keras.layers.Rescaling(255.0, name="to_pixels")(inputs)
    return keras.Model(inputs, model(pixels), name=name or f"{model.name}_0_1")


# The fields of RobustBench's model_info/<dataset>/<threat model>/<Name>.json, in their order;
# those we cannot know (paper, authors, venue, reported number) start empty for the user to fill.
_INFO_DEFAULTS = {
    "link": "",
    "name": "",
    "authors": "",
    "additional_data": False,  # Models trained here see only the dataset's own training split.
    "number_forward_passes": 1,
    "dataset": None,
    "venue": "",
    "architecture": "",
    "eps": None,
    "clean_acc": None,
    "reported": "",
    "autoattack_acc": None,
}
_MEASURED = ("dataset", "eps", "clean_acc", "autoattack_acc")


@dataclasses.dataclass(frozen=True)
class Result:
    """A RobustBench-protocol evaluation.

    Attributes:
        protocol: the `Protocol` followed.
        num_examples: examples evaluated (the first ones of the protocol's list).
        version: AutoAttack version, "standard" or "fast".
        clean_accuracy: fraction of the examples classified correctly.
        robust_accuracy: fraction still correct after every AutoAttack stage.
        stages: stage -> cumulative robust accuracy ("clean", "apgd-ce", "apgd-t", "square").
        image_size: side of the evaluated images.
        seed: seed of every attack.
        seconds: wall time of the attacks.
        source: where the images came from, in words.
        model_info: user fields of the RobustBench entry (architecture, name, link, ...).
        per_example: a `sat_tf.reporting.PerExample` (the stage that fooled each example).
        evaluation_id: the resumable evaluation's id (`sat_tf.evalstate`), or None.
    """

    protocol: Protocol
    num_examples: int
    version: str
    clean_accuracy: float
    robust_accuracy: float
    stages: dict
    image_size: int
    seed: int
    seconds: float
    source: str = ""
    model_info: dict = dataclasses.field(default_factory=dict)
    per_example: reporting.PerExample | None = None
    evaluation_id: str | None = None

    @property
    def deviations(self):
        """How this run differs from RobustBench's own evaluation, in words."""
        p = self.protocol
        found = [
            f"AutoAttack run by sat_tf.autoattack (Keras, {backend.NAME} backend), not the "
            "reference PyTorch code"
        ]
        if self.num_examples < p.num_examples:
            found.append(f"first {self.num_examples} of the protocol's {p.num_examples} examples")
        if self.version != "standard":
            found.append(f'AutoAttack version "{self.version}", not "standard"')
        if p.leaderboard == "cifar10" and self.image_size != p.image_size:
            found.append(f"{self.image_size}-pixel images, not CIFAR-10's {p.image_size}")
        if p.leaderboard == "imagenet":
            found.append("TF central-crop preprocessing, not torchvision Resize(256)+CenterCrop")
        return found

    def model_info_entry(self):
        """The JSON entry in the shape of RobustBench's model_info files, plus our "sat_tf" key.

        Accuracies are percentage strings with 2 decimals ("53.42"), eps a fraction of the [0, 1]
        range ("8/255"), as in RobustBench's files. Delete the "sat_tf" key before submitting.
        """
        entry = _INFO_DEFAULTS | self.model_info
        entry |= {
            "dataset": self.protocol.leaderboard,
            "eps": self.protocol.epsilon,
            "clean_acc": f"{100 * self.clean_accuracy:.2f}",
            "autoattack_acc": f"{100 * self.robust_accuracy:.2f}",
        }
        entry["sat_tf"] = {
            "num_examples": self.num_examples,
            "protocol_num_examples": self.protocol.num_examples,
            "autoattack_version": self.version,
            "attack": autoattack.describe(self.version),
            "epsilon_pixels": self.protocol.epsilon_pixels,
            "input_convention": "[0, 255] pixels; eps/255 of the [0, 1] range == eps pixels",
            "stages": self.stages,
            "image_size": self.image_size,
            "data": self.source,
            "seed": self.seed,
            "seconds": round(self.seconds, 1),
            "deviations": self.deviations,
        }
        return entry

    def card_entry(self, command=""):
        """The evaluation entry for the robustness card (`sat_tf.card.add_evaluation`)."""
        eps = self.protocol.epsilon_pixels
        attack = "autoattack" if self.version == "standard" else f"autoattack-{self.version}"
        return {
            "protocol": "robustbench",
            "robustbench_dataset": self.protocol.leaderboard,
            "dataset": self.source,
            "num_examples": self.num_examples,
            "threat_model": {
                "norm": "Linf",
                "epsilon": {"pixels": eps, "fraction_of_255": self.protocol.epsilon},
            },
            "clean_accuracy": self.clean_accuracy,
            "rows": [
                Row(attack, "autoattack", eps, self.robust_accuracy).to_dict(
                    ("attack", "kind", "epsilon", "accuracy")
                )
            ],
            "autoattack_stages": self.stages,
            "worst_case": {eps: self.robust_accuracy},
            "deviations": self.deviations,
            "seed": self.seed,
            "seconds": round(self.seconds, 1),
            "command": command,
            "evaluation_id": self.evaluation_id,
        }


def benchmark(
    model,
    images,
    labels,
    *,
    leaderboard,
    num_examples=None,
    version="standard",
    batch_size=128,
    seed=0,
    model_info=None,
    source="",
    verbose=0,
    state=None,
    discard_state=False,
    settings=None,
    shard=None,
):
    """Clean and AutoAttack accuracy under RobustBench's L-inf protocol for `leaderboard`.

    Args:
        model: Keras classifier taking [0, 255] pixels, returning logits.
        images: [N, S, S, 3] pixels in [0, 255] (uint8 or float), in the protocol's order.
        labels: [N] int classes.
        leaderboard: "cifar10" (epsilon 8/255 = 8 pixels) or "imagenet" (4/255 = 4 pixels).
        num_examples: evaluate the first this many; None: the protocol's full count.
        version: AutoAttack version, "standard" (the protocol) or "fast" (smoke runs).
        batch_size: examples per attack call.
        seed: seed of every attack.
        model_info: RobustBench fields to fill in (architecture, name, link, authors, venue,
            additional_data, number_forward_passes, reported, footnote); not measured ones.
        source: where the images came from, in words, for the records.
        verbose: 0 silent; 1 the work ahead, a time estimate and each stage's progress; 2 the
            resume line only (as `sat_tf.evaluation.evaluate`).
        state: path of a state file (`sat_tf.evalstate`) rewritten after every batch; the same
            call after a kill resumes from it and gives the same per-example results.
        discard_state: overwrite a state file of another evaluation instead of refusing.
        settings: further settings that change results, e.g. {"deterministic": True}: part of
            the state's fingerprint, so a resume under other settings is refused.
        shard: "I/N": attack only the examples whose index is I modulo N (one of N processes;
            `sat_tf.shards.merge` joins their states, docs/evaluation.md); the result is then
            that of this shard's examples.

    Returns:
        A `Result`.

    Raises:
        evalstate.StateMismatchError: `state` holds an unfinished run of another evaluation.
    """
    protocol = _protocol(leaderboard)
    n = protocol.num_examples if num_examples is None else int(num_examples)
    if not 0 < n <= min(protocol.num_examples, len(labels)):
        raise ValueError(
            f"num_examples must be in [1, {protocol.num_examples}] and at most the {len(labels)} "
            f"images given. Received: num_examples={num_examples}"
        )
    if version not in autoattack.VERSIONS:
        raise ValueError(
            f"version must be one of {sorted(autoattack.VERSIONS)}. Received: version={version!r}"
        )
    clashes = sorted(set(model_info or {}) & set(_MEASURED))
    if clashes:
        raise ValueError(f"model_info cannot set measured fields. Received: {clashes}")
    x, y = images[:n], np.asarray(labels[:n]).astype(np.int32)
    _check_pixels(x)
    ran, record = jobs.run(
        model,
        Examples((x, y), shard=shard),
        [(autoattack.spec(version), protocol.epsilon_pixels)],
        where="benchmark",
        seed=seed,
        batch_size=batch_size,
        chunk_size=CHUNK_BATCHES * batch_size,  # a chunk at a time in float32, not all
        state=state,
        discard_state=discard_state,
        verbose=verbose,
        protocol=protocol.leaderboard,
        **(settings or {}),
    )
    names = [p.name for p in ran[0].passes]
    stages = autoattack.stage_accuracies(record.fooled_by[0], names)
    return Result(
        protocol=protocol,
        num_examples=record.num_examples,
        version=version,
        clean_accuracy=stages["clean"],
        robust_accuracy=stages[names[-1]],
        stages=stages,
        image_size=int(x.shape[1]),
        seed=seed,
        seconds=float(record.seconds[0]),
        source=source,
        model_info=dict(model_info or {}),
        per_example=reporting.PerExample(
            labels=record.labels,
            fooled_by=record.fooled_by.copy(),
            jobs=[ran[0].label],
            passes=[names],
        ),
        evaluation_id=record.evaluation_id,
    )


def _protocol(leaderboard):
    if leaderboard not in PROTOCOLS:
        raise ValueError(
            f"leaderboard must be one of {sorted(PROTOCOLS)}. Received: {leaderboard!r}"
        )
    return PROTOCOLS[leaderboard]


def _check_pixels(images):
    """Refuses images outside [0, 255], and float images that look like [0, 1] ones."""
    low, high = float(np.min(images)), float(np.max(images))
    if low < 0 or high > 255:
        raise ValueError(f"images must be pixels in [0, 255]. Received: range [{low}, {high}]")
    if np.issubdtype(np.asarray(images).dtype, np.floating) and 0 < high <= 1:
        raise ValueError(
            f"images look like [0, 1] values (max {high}); this protocol takes [0, 255] pixels "
            "(multiply by 255), so that epsilon 8/255 is 8 pixels."
        )
