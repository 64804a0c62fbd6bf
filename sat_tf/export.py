"""SavedModel export for TF Serving, with two signatures.

- `serving_default`: float32 pixels [N, H, W, 3] in [0, 255] (the model's own input convention).
- `serving_bytes`: encoded JPEG/PNG strings [N], decoded, centre-cropped and resized exactly as the
  evaluation pipeline does (`sat_tf.data.preprocess_for_eval`).

Both return `logits`, `probabilities`, `top_k_classes` and `top_k_probabilities`. The export is
written under a temporary name and renamed to `<export_dir>/<version>` when complete: TF Serving
(which watches numeric sub-directories) never loads a half-written model.
"""

import json
from pathlib import Path

import keras
import tensorflow as tf

from sat_tf import data
from sat_tf.atomic import atomic_path


def _outputs(model, images, top_k):
    logits = tf.cast(model(images, training=False), tf.float32)
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
    """
    if int(version) < 1:
        raise ValueError(f"`version` must be a positive integer. Received: version={version}")
    final = Path(export_dir) / str(int(version))
    if final.exists():
        raise FileExistsError(f"{final} exists; pick another --version or remove it first.")
    top_k = min(top_k, int(model.output_shape[-1]))
    augmentation = "inception" if central_crop else "cifar"  # eval counterpart of each
    archive = keras.export.ExportArchive()
    archive.track(model)

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
            return _outputs(model, tf.identity(images), top_k)

    def decode(encoded):
        # Untrusted requests: refuse empty, non-JPEG/PNG and decompression-bomb images (header
        # above data.preprocessing.MAX_PIXELS) before decoding allocates anything.
        problem = data.checks.validate(encoded, tf.constant(0, tf.int64))
        check = tf.debugging.Assert(tf.equal(problem, ""), ["`image_bytes`: the image", problem])
        with tf.control_dependencies([check]):
            encoded = tf.identity(encoded)
        return data.preprocess_for_eval(encoded, image_size=image_size, augmentation=augmentation)

    def from_bytes(image_bytes):
        images = tf.map_fn(
            decode,
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )
        return _outputs(model, images, top_k)

    archive.add_endpoint("serving_default", from_pixels, input_signature=[pixels_spec])
    archive.add_endpoint("serving_bytes", from_bytes, input_signature=[bytes_spec])

    with atomic_path(final) as partial:
        archive.write_out(str(partial), verbose=False)
        if card is not None:
            (partial / "assets.extra").mkdir(exist_ok=True)
            (partial / "assets.extra" / "robustness_card.json").write_text(
                json.dumps(card, indent=2)
            )
    return final
