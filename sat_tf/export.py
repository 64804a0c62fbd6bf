"""SavedModel export for TF Serving, with two signatures.

- `serving_default`: float32 pixels [N, H, W, 3] in [0, 255] (the model's own input convention).
- `serving_bytes`: encoded JPEG/PNG strings [N], decoded, centre-cropped and resized exactly as the
  evaluation pipeline does (`sat_tf.data.preprocess_for_eval`).

Both return `logits`, `probabilities`, `top_k_classes` and `top_k_probabilities`; an empty batch
returns empty outputs. Requests are untrusted, so both signatures check them in the graph and name
the bad images by index: `serving_default` refuses NaN/Inf pixels and pixels outside
[0, 255] by more than `PIXEL_TOLERANCE` (a client that sends [0, 65535] or mean-subtracted values
gets an error, not a confident wrong class) and clips the small overshoot of bicubic resizing into
[0, 255], the domain the model was trained on; `serving_bytes` names each image it cannot decode.
The export is written under a temporary name and renamed to `<export_dir>/<version>` when
complete: TF Serving (which watches numeric sub-directories) never loads a half-written model.

A SavedModel is TensorFlow's format, so exporting needs TensorFlow under any Keras backend. Under
JAX the model's forward pass is converted with jax2tf, as Keras's own `ExportArchive` does (its
StableHLO is embedded for the CPU and CUDA platforms), and the two signatures around it are the
same TensorFlow code as under the TensorFlow backend.
"""

import json
from pathlib import Path

import keras
import numpy as np

from sat_tf import backend, rundir
from sat_tf.atomic import atomic_path

tf = backend.tensorflow("SavedModel export (sat_tf.export)")

from sat_tf import data  # noqa: E402  (tf.data preprocessing of serving_bytes)

# Pixels within this distance outside [0, 255] are clipped (resampling overshoot); further out
# the request is refused: the values are not [0, 255] pixels.
PIXEL_TOLERANCE = 1.0


def _outputs(logits_of, num_classes, images, top_k):
    # An empty batch trips some layers (BatchNorm broadcasting); answer it without the model.
    logits = tf.cond(
        tf.shape(images)[0] > 0,
        lambda: logits_of(images),
        lambda: tf.zeros([0, num_classes], tf.float32),
    )
    probabilities = tf.nn.softmax(logits)
    top = tf.math.top_k(probabilities, k=top_k)
    return {
        "logits": logits,
        "probabilities": probabilities,
        "top_k_classes": top.indices,
        "top_k_probabilities": top.values,
    }


def export_saved_model(
    model, export_dir, *, image_size, central_crop=True, version=1, top_k=5, card=None
):
    """Writes `model` as a SavedModel to `<export_dir>/<version>` and returns that path.

    Args:
        model: A classifier taking [0, 255] pixels (e.g. `AdversarialModel.classifier`).
        export_dir: The base directory TF Serving is pointed at.
        image_size: Resolution `serving_bytes` resizes to.
        central_crop: Crop the central 224/256 before resizing (ImageNet-style evaluation);
            False resizes the whole image (CIFAR-style and demo data).
        version: Positive integer version (TF Serving serves the highest).
        top_k: Number of classes in the top-k outputs.
        card: Optional dict written to `assets.extra/robustness_card.json`.

    Raises:
        FileExistsError: that version exists.
        sat_tf.rundir.RunWriteError: the export could not be written (one line; the partial
            export is removed).
    """
    if backend.NAME == "torch":
        raise ValueError(
            "A SavedModel is exported from TensorFlow or JAX code; export under "
            "KERAS_BACKEND=tensorflow (or jax): the .keras file is the same on every backend."
        )
    if int(version) < 1:
        raise ValueError(f"`version` must be a positive integer. Received: version={version}")
    final = Path(export_dir) / str(int(version))
    if final.exists():
        raise FileExistsError(f"{final} exists; pick another --version or remove it first.")
    num_classes = int(model.output_shape[-1])
    top_k = min(top_k, num_classes)
    augmentation = "inception" if central_crop else "cifar"  # eval counterpart of each
    archive = keras.export.ExportArchive()
    archive.track(model)
    logits_of = _logits_function(model, archive, image_size)

    pixels_spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
    bytes_spec = tf.TensorSpec([None], tf.string, name="image_bytes")

    def from_pixels(images):
        # Serving does not enforce the signature's static shape: check it, with a clear message.
        expected = f"`images` must be float32 [N, {image_size}, {image_size}, 3] pixels in [0, 255]"
        checks = [
            tf.debugging.assert_rank(images, 4, message=expected),
            tf.debugging.assert_equal(
                tf.shape(images)[1:], [image_size, image_size, 3], message=expected
            ),
        ]
        with tf.control_dependencies(checks):
            images = tf.identity(images)
        with tf.control_dependencies(_pixel_checks(images)):
            images = tf.clip_by_value(images, 0.0, 255.0)
        return _outputs(logits_of, num_classes, images, top_k)

    def decode(encoded):
        return data.preprocess_for_eval(encoded, image_size=image_size, augmentation=augmentation)

    def from_bytes(image_bytes):
        return _outputs(logits_of, num_classes, _decode_all(image_bytes, decode, image_size), top_k)

    # Traced here (TensorFlow code under every backend), so the archive takes them as they are.
    for name, fn, spec in (
        ("serving_default", from_pixels, pixels_spec),
        ("serving_bytes", from_bytes, bytes_spec),
    ):
        traced = tf.function(fn, input_signature=[spec], autograph=False)
        traced.get_concrete_function()
        archive.add_endpoint(name, traced)

    try:
        with atomic_path(final) as partial:
            archive.write_out(str(partial), verbose=False)
            if card is not None:
                (partial / "assets.extra").mkdir(exist_ok=True)
                extra = partial / "assets.extra" / "robustness_card.json"
                extra.write_text(json.dumps(card, indent=2))
    except (OSError, tf.errors.OpError) as error:  # disk full, read-only folder
        raise rundir.write_failure(
            f"the SavedModel version {int(version)}",
            final.parent,
            f"the model file; nothing was published ({final} does not exist, other versions "
            "are untouched)",
            "re-run the export",
            error,
        ) from None
    return final


def _logits_function(model, archive, image_size):
    """TensorFlow function: float32 pixels [N, S, S, 3] -> float32 logits of `model`.

    TensorFlow backend: the model itself. JAX: the model's forward pass converted by jax2tf with
    its weights as arguments (so they are saved as variables, not constants), bound to the
    TensorFlow copies of them `archive.track` made, as Keras's JAX export does.
    """
    if backend.NAME == "tensorflow":
        return lambda images: tf.cast(model(images, training=False), tf.float32)
    from jax.experimental import jax2tf

    weights = [*model.trainable_variables, *model.non_trainable_variables]
    copies = list(archive.variables)  # in that order: checked, value by value
    if len(copies) != len(weights) or not all(
        tuple(c.shape) == tuple(w.shape)
        and np.array_equal(c.numpy(), keras.ops.convert_to_numpy(w))
        for c, w in zip(copies, weights, strict=False)
    ):
        raise RuntimeError(
            "keras.export.ExportArchive's TensorFlow copies of the model's weights are not in "
            "the model's order in this Keras version; export under KERAS_BACKEND=tensorflow."
        )

    def logits(values, images):
        with keras.StatelessScope(state_mapping=list(zip(weights, values, strict=True))):
            return keras.ops.cast(model(images, training=False), "float32")

    converted = jax2tf.convert(
        logits,
        polymorphic_shapes=[None, f"(batch, {image_size}, {image_size}, 3)"],
        native_serialization_platforms=("cpu", "cuda"),
    )
    return lambda images: converted(copies, images)


def _listed(bad, what=None):
    """One string naming the batch positions where `bad` holds: "image 1, image 3" or, with a
    string vector `what`, "image 1 <what[1]>; image 3 <what[3]>"."""
    names = tf.strings.join(["image ", tf.strings.as_string(tf.where(bad)[:, 0])])
    if what is None:
        return tf.strings.reduce_join(names, separator=", ")
    return tf.strings.reduce_join(
        tf.strings.join([names, tf.boolean_mask(what, bad)], separator=" "), separator="; "
    )


def _pixel_checks(images):
    """Asserts naming the images with non-finite pixels or pixels far outside [0, 255]."""
    axes = [1, 2, 3]
    finite = tf.reduce_all(tf.math.is_finite(images), axis=axes)
    low, high = -PIXEL_TOLERANCE, 255.0 + PIXEL_TOLERANCE
    inside = tf.reduce_all(tf.logical_and(images >= low, images <= high), axis=axes)
    inside = tf.logical_or(inside, tf.logical_not(finite))  # reported as non-finite
    span = tf.strings.format("(min {}, max {})", (tf.reduce_min(images), tf.reduce_max(images)))
    return [
        tf.debugging.Assert(
            tf.reduce_all(finite),
            [tf.strings.join(["`images`: NaN or Inf pixels in ", _listed(~finite)])],
        ),
        tf.debugging.Assert(
            tf.reduce_all(inside),
            [
                tf.strings.join(
                    [
                        "`images`: pixels must be in [0, 255]; outside it in ",
                        _listed(~inside),
                        " ",
                        span,
                        ". Send RGB pixels in [0, 255], not scaled or normalised values.",
                    ]
                )
            ],
        ),
    ]


def _decode_all(image_bytes, decode, image_size):
    """Decodes a batch of encoded images, naming by index every one that cannot be decoded.

    Header problems (empty, not JPEG/PNG, a decompression bomb above
    `data.preprocessing.MAX_PIXELS`) are found before that image is decoded, as in training's
    `data.checks`. A decoder error cannot carry the index in TensorFlow, so each image is
    checked and decoded under tf.data's `ignore_errors`: the indices missing from its output
    are the images that failed.
    """
    count = tf.shape(image_bytes, out_type=tf.int64)[0]
    placeholder = tf.zeros([image_size, image_size, 3], tf.float32)

    def check_and_decode(index, encoded):
        problem = data.checks.validate(encoded, tf.constant(0, tf.int64))
        image = tf.cond(tf.equal(problem, ""), lambda: decode(encoded), lambda: placeholder)
        return index, problem, image

    decoded = (
        tf.data.Dataset.from_tensor_slices((tf.range(count), image_bytes))
        .map(check_and_decode)
        .ignore_errors()
        .batch(tf.maximum(count, 1))
    )
    empty = (tf.zeros([0], tf.int64), tf.zeros([0], tf.string), placeholder[None][:0])
    done, problems, images = decoded.reduce(empty, lambda _, batch: batch)
    # Every image gets a problem: "" when fine, "could not be decoded" when it is missing.
    where = tf.reduce_any(tf.equal(tf.range(count)[:, None], done[None, :]), axis=1)
    problems = tf.tensor_scatter_nd_update(
        tf.fill([count], "could not be decoded"), tf.where(where), problems
    )
    bad = tf.not_equal(problems, "")
    check = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)),
        [tf.strings.join(["`image_bytes`: ", _listed(bad, problems)])],
    )
    with tf.control_dependencies([check]):
        return tf.identity(images)
