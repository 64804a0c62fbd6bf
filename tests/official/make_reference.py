"""Writes the reference logits of the official SAT ResNet code (run by `make test-official`).

    .venv-official/bin/python tests/official/make_reference.py --official_dir=<clone of
        github.com/cihangxie/SmoothAdversarialTraining> --images=<imagenette-224 val folder>

Runs in an optional environment (tensorflow-cpu 2.21 + tf-keras + tensorpack 0.11 + OpenCV), never
in `make test`. It copies the official ResNet code to a temporary folder (nothing of it enters this
repository), applies one-line shims for TensorFlow 2.21, builds the official graph in
`tf.compat.v1` graph mode, writes the graph's variable names and shapes (tests/official/*.txt),
restores a checkpoint filled by weights.py, and writes the logits of a few Imagenette images
preprocessed by the official evaluation loader (tensorpack imgaug, third_party/imagenet_utils.py
lines 50-52, images read with cv2 as BGR, line 89).
"""

import argparse
import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import weights  # noqa: E402

# Shims for TensorFlow 2.21 applied to the temporary copy: the TF1 API, and tf.nn.swish without
# the `name=` the official code passes (resnet_model.py lines 75, 99, 168).
SHIMS = (
    ("import tensorflow as tf\n", "import tensorflow.compat.v1 as tf\n"),
    ("'silu': tf.nn.swish,", "'silu': lambda x, name=None: tf.nn.swish(x),"),
)
NUM_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}  # nets.py lines 12-16
# (file stem, depth, group, res2_bottleneck, activations)
MODELS = (
    ("resnet50", 50, 1, 64, ("relu", "silu", "elu", "gelu", "softplus", "mish")),
    ("resnet50_smoothrelu", 50, 1, 64, ("smoothrelu",)),
    ("resnext50_32x4d", 50, 32, 4, ("silu",)),
)


def official_module(official_dir, work):
    """Imports a shimmed copy of ResNet/resnet_model.py from `work`."""
    source = (Path(official_dir) / "ResNet" / "resnet_model.py").read_text()
    for old, new in SHIMS:
        if old not in source:
            sys.exit(f"error: shim target {old!r} not in the official resnet_model.py")
        source = source.replace(old, new)
    (Path(work) / "resnet_model.py").write_text(source)
    sys.path.insert(0, str(work))
    import resnet_model

    return resnet_model


def load_images(folder, count, size):
    """The official evaluation loader: cv2 BGR, shorter side to size + 32 (bicubic), centre crop."""
    import cv2
    from tensorpack import imgaug

    files = sorted(glob.glob(os.path.join(folder, "*", "*.JPEG")))
    files = files[:: max(1, len(files) // count)][:count]
    augmentor = imgaug.AugmentorList(  # third_party/imagenet_utils.py lines 50-53
        [imgaug.ResizeShortestEdge(size + 32, cv2.INTER_CUBIC), imgaug.CenterCrop((size, size))]
    )
    images = [augmentor.augment(cv2.imread(f, cv2.IMREAD_COLOR)) for f in files]
    return np.stack(images).astype("uint8"), [os.path.relpath(f, folder) for f in files]


def reference_logits(resnet_model, bgr, depth, group, bottleneck, activation, names_path, ckpt):
    import tensorflow.compat.v1 as tf
    from tensorpack.tfutils.tower import TowerContext

    tf.reset_default_graph()
    image = tf.placeholder(tf.float32, [None, *bgr.shape[1:]], "input")
    x = image * (2.0 / 255) - 1.0  # adv_model.py image_preprocess, line 236
    x = tf.transpose(x, [0, 3, 1, 2])  # adv_model.py line 222: NCHW

    def block_func(layer, ch_out, stride):  # nets.py lines 28-30
        return resnet_model.resnet_bottleneck(
            layer, ch_out, stride, group=group, res2_bottleneck=bottleneck,
            activation_name=activation,
        )  # fmt: skip

    with TowerContext("", is_training=False):
        logits = resnet_model.resnet_backbone(
            x, NUM_BLOCKS[depth], resnet_model.resnet_group, block_func, activation_name=activation
        )
    rows = [(v.op.name, tuple(v.shape.as_list())) for v in tf.global_variables()]
    _check_names(names_path, rows)
    weights.write_checkpoint(ckpt, rows)
    # TF 2.21's CPU remapper fuses FusedBatchNorm + Mish but has no kernel for it: turn it off.
    config = tf.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    config.graph_options.rewrite_options.remapping = 2  # RewriterConfig.OFF
    with tf.Session(config=config) as session:
        tf.train.Saver().restore(session, ckpt)
        return session.run(logits, {image: bgr.astype("float32")})


def efficientnet_logits(official_dir, work, rgb, model_name, names_path, ckpt):
    """Raw and moving-average logits of the official EfficientNet (efficientnet_builder.py)."""
    import tensorflow.compat.v1 as tf

    folder = Path(work) / "efficientnet"
    (folder / "condconv").mkdir(parents=True)
    for name in ("efficientnet_builder.py", "efficientnet_model.py", "utils.py"):
        shutil.copy(Path(official_dir) / "EfficientNet" / name, folder / name)
    # efficientnet_model.py imports condconv_layers, which the repository does not ship; CondConv
    # is off for every released model, so an empty module is enough.
    (folder / "condconv" / "__init__.py").write_text("")
    (folder / "condconv" / "condconv_layers.py").write_text(
        "CondConv2D = DepthwiseCondConv2D = None\n"
    )
    sys.path.insert(0, str(folder))
    import efficientnet_builder
    import utils

    tf.reset_default_graph()
    tf.keras.backend.set_learning_phase(False)
    image = tf.placeholder(tf.float32, [None, *rgb.shape[1:]], "input")
    features = image * (2.0 / 255) - 1.0  # main.py normalize_features, --sat_preprocessing
    # The README's evaluation flags; channels_last because TF's CPU kernels need it (the same math).
    params = {
        "batch_norm_momentum": 0.9,
        "batch_norm_epsilon": 1e-5,
        "data_format": "channels_last",
    }
    logits, _ = efficientnet_builder.build_model(features, model_name, False, params)
    variables = tf.global_variables()
    # tf-keras 2.21 gives BN vectors a [1, 1, 1, 1, C] shape; TF1 wrote [C], as the released files.
    rows = [(v.op.name, tuple(d for d in v.shape.as_list() if d != 1) or (1,)) for v in variables]
    rows = [(n, s if "normalization" in n else tuple(v.shape.as_list()))
            for (n, s), v in zip(rows, variables, strict=True)]  # fmt: skip
    shadows = tf.train.ExponentialMovingAverage(0.9999).variables_to_restore(utils.get_ema_vars())
    rows += [(n, dict(rows)[v.op.name]) for n, v in shadows.items() if n != v.op.name]
    rows += [("global_step", ())]
    _check_names(names_path, rows)
    weights.write_checkpoint(ckpt, rows)
    config = tf.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    results = {}
    with tf.Session(config=config) as session:
        for kind, mapping in (("raw", {v.op.name: v for v in variables}), ("ema", shadows)):
            for name, variable in mapping.items():  # the official restore map, reshaped
                value = weights.value(name, dict(rows)[name]).reshape(variable.shape.as_list())
                variable.load(value, session)
            results[kind] = session.run(logits, {image: rgb.astype("float32")})
    return results


def _check_names(names_path, rows):
    if names_path.exists() and weights.read_names(names_path) != rows:
        sys.exit(f"error: {names_path} differs from the official graph's variables")
    weights.write_names(names_path, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official_dir", required=True)
    parser.add_argument("--images", required=True, help="Imagenette val folder (<wnid>/*.JPEG)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--resnet", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--efficientnet", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    import tensorflow.compat.v1 as tf

    tf.disable_eager_execution()
    out = Path(args.out)
    work = tempfile.mkdtemp(prefix="sat_official_")
    try:
        resnet_model = official_module(args.official_dir, work)
        bgr, files = load_images(args.images, args.count, args.size)
        np.save(out / "images_rgb.npy", bgr[..., ::-1])
        (out / "images.txt").write_text("\n".join(files) + "\n")
        for stem, depth, group, bottleneck, activations in MODELS if args.resnet else ():
            for activation in activations:
                logits = reference_logits(
                    resnet_model, bgr, depth, group, bottleneck, activation,
                    out / f"{stem}_variables.txt", os.path.join(work, "ckpt", stem),
                )  # fmt: skip
                name = stem.split("_")[0] if stem.endswith("smoothrelu") else stem
                np.save(out / f"{name}_{activation}_logits.npy", logits.astype("float32"))
                print(f"{name} {activation}: top-1 {logits.argmax(1).tolist()}")
        if args.efficientnet:
            results = efficientnet_logits(
                args.official_dir, work, bgr[..., ::-1], "efficientnet-b0",
                out / "efficientnet_b0_variables.txt", os.path.join(work, "ckpt", "effnet"),
            )  # fmt: skip
            for kind, logits in results.items():
                np.save(out / f"efficientnet_b0_{kind}_logits.npy", logits.astype("float32"))
                print(f"efficientnet-b0 {kind}: top-1 {logits.argmax(1).tolist()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
