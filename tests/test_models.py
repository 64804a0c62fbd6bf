"""Tests for sat_tf.models: counts against published numbers and closed-form formulas, the
activation in every block, init/BN recipe, serialization, mixed precision.

Big models are only built (cheap) and run forward at 32x32 pixels, never at their native size.
"""

import functools
import math
import pathlib

import keras
import numpy as np
import pytest

from sat_tf import activations, models, saving

# Under JAX (`backends`) only the tests marked so run: building a model there compiles each
# initializer once per weight shape (an EfficientNet: a minute on 2 cores), so the backend suite
# builds the small nets and loads the tiny saved fixtures of every family (loading builds too:
# he_resnet8 there is the option-A CIFAR ResNet that resnet20 would repeat).
JAX_BUILT = {"small_cnn"}

# Published trainable-parameter counts, 1000 classes: torchvision's ResNet/ResNeXt tables and
# the EfficientNet paper / official checkpoints (equal to keras.applications' trainable counts).
PUBLISHED_1000 = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
}
# Published counts, 10 classes: He et al. 2016 option-A ResNets (0.27M / 0.85M) and WRNs as
# reported by Madry et al. / TRADES code (36.5M / 46.2M).
PUBLISHED_10 = {
    "resnet20": 269_722,
    "resnet56": 853_018,
    "wide_resnet28_10": 36_479_194,
    "wide_resnet34_10": 46_160_474,
}

# Paper architectures, written down independently of the code under test.
RESNETS = {  # name -> (bottleneck?, blocks per stage, groups, width per group)
    "resnet18": (False, (2, 2, 2, 2), 1, 64),
    "resnet34": (False, (3, 4, 6, 3), 1, 64),
    "resnet50": (True, (3, 4, 6, 3), 1, 64),
    "resnet101": (True, (3, 4, 23, 3), 1, 64),
    "resnet152": (True, (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": (True, (3, 4, 6, 3), 32, 4),
    "resnext50_32x8d": (True, (3, 4, 6, 3), 32, 8),
    "resnext101_32x8d": (True, (3, 4, 23, 3), 32, 8),
    "resnext152_32x8d": (True, (3, 8, 36, 3), 32, 8),
}
EFFICIENTNETS = {  # name -> (width, depth, native resolution): Tan & Le 2019; Xie et al. 2020
    "efficientnet_b0": (1.0, 1.0, 224),
    "efficientnet_b1": (1.0, 1.1, 240),
    "efficientnet_b2": (1.1, 1.2, 260),
    "efficientnet_b3": (1.2, 1.4, 300),
    "efficientnet_b4": (1.4, 1.8, 380),
    "efficientnet_b5": (1.6, 2.2, 456),
    "efficientnet_b6": (1.8, 2.6, 528),
    "efficientnet_b7": (2.0, 3.1, 600),
    "efficientnet_l1": (3.9, 3.7, 600),
}
# B0 stages: (kernel, repeats, out channels, expand ratio); stem 32, head 1280, SE ratio 0.25.
B0_STAGES = ((3, 1, 16, 1), (3, 2, 24, 6), (5, 2, 40, 6), (3, 3, 80, 6), (5, 3, 112, 6))
B0_STAGES += ((5, 4, 192, 6), (3, 1, 320, 6))
CIFAR = ("resnet20", "resnet56", "preact_resnet18", "wide_resnet28_10", "wide_resnet34_10")
# Building these takes 3-25 s each on a loaded 2-core CPU; the default run covers every block type
# (basic, bottleneck, grouped, MBConv, option A, pre-activation) with the others.
FAST = {"resnet18", "resnet50", "resnext50_32x4d", "efficientnet_b0", "small_cnn"} | set(CIFAR)
FAST -= {"wide_resnet34_10"}


def _bn(c):
    return 2 * c  # trainable gamma and beta


def resnet_params(name, num_classes):
    """Closed-form count of an ImageNet ResNet/ResNeXt (bias-free convs, projection shortcuts)."""
    bottleneck, depths, groups, per_group = RESNETS[name]
    total, cin = 7 * 7 * 3 * 64 + _bn(64), 64
    for stage, (filters, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
        for i in range(depth):
            if bottleneck:
                w, cout = filters * groups * per_group // 64, 4 * filters
                total += cin * w + 9 * w * w // groups + w * cout + _bn(w) * 2 + _bn(cout)
            else:
                cout = filters
                total += 9 * cin * cout + 9 * cout * cout + 2 * _bn(cout)
            if cin != cout or (stage > 0 and i == 0):
                total += cin * cout + _bn(cout)
            cin = cout
    return total + cin * num_classes + num_classes


def _round_filters(filters, width):
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


def efficientnet_blocks(name):
    """(in, out, kernel, expand) of every MBConv block, from the paper's scaling rules."""
    width, depth, _ = EFFICIENTNETS[name]
    blocks, cin = [], _round_filters(32, width)
    for kernel, repeats, out, expand in B0_STAGES:
        for _ in range(math.ceil(depth * repeats)):
            blocks.append((cin, _round_filters(out, width), kernel, expand))
            cin = blocks[-1][1]
    return blocks


def efficientnet_params(name, num_classes):
    """Closed-form count: stem, MBConv blocks (expand, depthwise, SE with biases, project), head."""
    width = EFFICIENTNETS[name][0]
    stem, head = _round_filters(32, width), _round_filters(1280, width)
    total = 27 * stem + _bn(stem)
    for cin, cout, kernel, expand in efficientnet_blocks(name):
        mid, se = cin * expand, max(1, int(cin * 0.25))
        total += (cin * mid + _bn(mid)) if expand != 1 else 0
        total += kernel * kernel * mid + _bn(mid)
        total += (mid * se + se) + (se * mid + mid) + mid * cout + _bn(cout)
    total += cout * head + _bn(head)
    return total + head * num_classes + num_classes


def cifar_params(name, num_classes):
    """Closed-form count of the CIFAR nets (option A: parameter-free shortcuts)."""
    if name in ("resnet20", "resnet56"):
        n, widths, total, cin = (int(name[6:]) - 2) // 6, (16, 32, 64), 27 * 16 + _bn(16), 16
    else:
        wide = name.startswith("wide")
        n = (int(name[11:13]) - 4) // 6 if wide else 2
        widths = (160, 320, 640) if wide else (64, 128, 256, 512)
        cin = 16 if wide else 64
        total = 27 * cin
    for stage, width in enumerate(widths):
        for i in range(n):
            total += 9 * cin * width + 9 * width * width
            if name in ("resnet20", "resnet56"):
                total += 2 * _bn(width)  # conv-BN-act-conv-BN
            else:
                total += _bn(cin) + _bn(width)  # BN-act-conv-BN-act-conv
                if cin != width or (stage and not i):
                    total += cin * width  # 1x1 projection, no BN
            cin = width
    if name not in ("resnet20", "resnet56"):
        total += _bn(cin)  # the final BN of pre-activation nets
    return total + cin * num_classes + num_classes


def expected_activations(name):
    """How many activation layers the paper architecture has (every one must be ours)."""
    if name in RESNETS:
        bottleneck, depths, *_ = RESNETS[name]
        return 1 + (3 if bottleneck else 2) * sum(depths)
    if name in EFFICIENTNETS:
        blocks = efficientnet_blocks(name)
        return 2 + sum(expand != 1 for *_, expand in blocks) + 2 * len(blocks)  # dw + SE each
    if name in ("resnet20", "resnet56"):
        return 1 + 2 * 3 * ((int(name[6:]) - 2) // 6)
    if name == "preact_resnet18":
        return 2 * 8 + 1
    return 2 * 3 * ((int(name[11:13]) - 4) // 6) + 1


def small_cnn_params(num_classes, width=16):
    convs = 27 * width + 9 * width * 2 * width + 9 * 2 * width * 4 * width
    return (
        convs + _bn(width) + _bn(2 * width) + _bn(4 * width) + 4 * width * num_classes + num_classes
    )


def formula_params(name, num_classes):
    if name in RESNETS:
        return resnet_params(name, num_classes)
    if name in EFFICIENTNETS:
        return efficientnet_params(name, num_classes)
    if name in CIFAR:
        return cifar_params(name, num_classes)
    return small_cnn_params(num_classes)


def _count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _layers(model, kind=object):
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, kind)]


def _relu_layers(model):
    """Every place a ReLU could hide: ReLU layers, Activation('relu'), activation=relu."""
    found = [layer.name for layer in _layers(model, keras.layers.ReLU)]
    for layer in _layers(model):
        if getattr(getattr(layer, "activation", None), "__name__", "") in ("relu", "relu6"):
            found.append(layer.name)
    return found


def _pixels(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _num_classes(name):
    return 10 if name in CIFAR or name == "small_cnn" else 1000


def test_names_cover_the_issue():
    assert set(models.names()) == set(RESNETS) | set(EFFICIENTNETS) | set(CIFAR) | {"small_cnn"}


@pytest.mark.parametrize("name", sorted(PUBLISHED_1000) + sorted(PUBLISHED_10))
def test_formulas_reproduce_published_counts(name):
    """Validates the closed forms used below for the models without a published count."""
    published = {**PUBLISHED_1000, **PUBLISHED_10}[name]
    assert formula_params(name, _num_classes(name)) == published


# The largest builds (30M-90M weights initialised: about a minute of CPU together) run with
# `pytest -m heavy`, not in `make test`; their counts' formulas and scaling coefficients are
# checked above without building them.
HEAVY = {"efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7"}
HEAVY |= {"efficientnet_l1", "resnext152_32x8d"}


def _marks(name):
    if name in HEAVY:
        return (pytest.mark.heavy,)
    return (
        (pytest.mark.backends,)
        if name in JAX_BUILT
        else ()
        if name in FAST
        else (pytest.mark.slow,)
    )


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in models.names()])
def test_every_model_count_activations_and_forward(name):
    num_classes = _num_classes(name)
    model = models.build(name, num_classes=num_classes, activation="silu", input_shape=(32, 32, 3))
    assert model.name == name
    published = {**PUBLISHED_1000, **PUBLISHED_10}
    assert _count(model) == published.get(name, formula_params(name, num_classes))
    assert _relu_layers(model) == []
    assert len(_layers(model, activations.SiLU)) == (
        3 if name == "small_cnn" else expected_activations(name)
    )
    assert isinstance(model.layers[1], keras.layers.Rescaling)  # normalisation comes first
    logits = model(_pixels(2, 32), training=False)
    assert tuple(logits.shape) == (2, num_classes)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))


@pytest.mark.parametrize(
    "name,size",
    [("resnet18", 224), ("efficientnet_b1", 240), ("resnet20", 32), ("small_cnn", 32)],
)
def test_default_input_is_native_resolution(name, size):
    model = models.build(name, num_classes=10)
    assert model.input_shape == (None, size, size, 3)


def test_efficientnet_scaling_table_matches_papers():
    from sat_tf.models import efficientnet

    for name, (width, depth, resolution) in EFFICIENTNETS.items():
        assert efficientnet.CONFIGS[name][:3] == (width, depth, resolution)


@pytest.fixture(scope="module")
def resnet50():
    """The issue's 'Done when' model."""
    return models.build("resnet50", num_classes=1000, activation="gelu")


@pytest.fixture(scope="module")
def efficientnet_b0():
    return models.build("efficientnet_b0", num_classes=1000, activation="silu")


def test_resnet_recipe(resnet50):
    assert resnet50.input_shape == (None, 224, 224, 3)
    normalize = resnet50.get_layer("normalize")
    assert resnet50.layers[1] is normalize
    np.testing.assert_allclose(normalize(np.array([[0.0, 127.5, 255.0]])), [[-1, 0, 1]], atol=1e-6)
    bns = _layers(resnet50, keras.layers.BatchNormalization)
    assert {(bn.momentum, bn.epsilon) for bn in bns} == {(0.9, 1e-5)}
    zero = {bn.name for bn in bns if not np.any(bn.gamma.numpy())}
    assert zero == {
        f"stage{s}_block{b + 1}_bn3" for s, n in enumerate((3, 4, 6, 3), 1) for b in range(n)
    }
    # v1.5: the stride is on the 3x3 conv.
    assert resnet50.get_layer("stage2_block1_conv1").strides == (1, 1)
    assert resnet50.get_layer("stage2_block1_conv2").strides == (2, 2)
    dense = resnet50.get_layer("logits").kernel.numpy()
    assert abs(dense.std() - 0.01) < 2e-4 and abs(dense.mean()) < 1e-4
    conv = resnet50.get_layer("stage4_block1_conv2").kernel.numpy()  # He, fan_out = 3 * 3 * 512
    assert abs(conv.std() / math.sqrt(2 / (9 * 512)) - 1) < 0.02


def test_resnet_summary_reports_published_count(resnet50):
    """The issue's 'Done when' command, with a check on what it prints."""
    lines = []
    resnet50.summary(print_fn=lambda line, **_: lines.append(line))
    text = "\n".join(lines)
    assert "resnet50" in text and "Trainable params: 25,557,032" in text
    assert len(_layers(resnet50, activations.GELU)) == expected_activations("resnet50")


def test_efficientnet_recipe(efficientnet_b0):
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    assert efficientnet_b0.input_shape == (None, 224, 224, 3)
    normalize = efficientnet_b0.get_layer("normalize")
    np.testing.assert_allclose(
        normalize(np.stack([mean, mean + std])), [[0] * 3, [1] * 3], atol=1e-5
    )
    bns = _layers(efficientnet_b0, keras.layers.BatchNormalization)
    assert {(bn.momentum, bn.epsilon) for bn in bns} == {(0.99, 1e-3)}
    assert all(np.all(bn.gamma.numpy() == 1) for bn in bns)
    dense = efficientnet_b0.get_layer("logits").kernel.numpy()
    bound = 1 / math.sqrt(1000)  # official dense_kernel_initializer
    assert np.abs(dense).max() <= bound and abs(dense.std() / (bound / math.sqrt(3)) - 1) < 0.02
    blocks = efficientnet_blocks("efficientnet_b0")
    expected = [0.2 * i / len(blocks) for i, (cin, cout, *_) in enumerate(blocks) if cin == cout]
    drops = [layer for layer in _layers(efficientnet_b0, keras.layers.Dropout) if layer.noise_shape]
    np.testing.assert_allclose([d.rate for d in drops], expected)
    assert {tuple(d.noise_shape) for d in drops} == {(None, 1, 1, 1)}
    assert efficientnet_b0.get_layer("head_dropout").rate == 0.2


def test_weight_decay_variables_are_the_kernels(resnet50, efficientnet_b0):
    resnet20 = models.build("resnet20", num_classes=10, activation="smooth_relu")
    # conv layers: stem + per block (1x1 projections, 3x3 pairs, expand/dw/SE pair/project) + dense
    for model, convs in ((resnet50, 1 + 3 * 16 + 4), (efficientnet_b0, 2 + 15 + 4 * 16)) + (
        (resnet20, 1 + 2 * 9),
    ):
        decayed = models.weight_decay_variables(model)
        assert len(decayed) == len({id(v) for v in decayed}) == convs + 1
        assert all(v.path.endswith("/kernel") for v in decayed)
        assert any(v is model.get_layer("logits").kernel for v in decayed)
    betas = [layer.b for layer in _layers(resnet20, activations.SmoothReLU)]
    assert len(betas) == expected_activations("resnet20")
    assert not {id(b) for b in betas} & {id(v) for v in models.weight_decay_variables(resnet20)}


@pytest.mark.parametrize(
    "identifier,kind",
    [
        ("gelu", activations.GELU),
        (activations.Mish, activations.Mish),
        ({"class_name": "sat_tf>ELU", "config": {"alpha": 0.5}}, activations.ELU),
        (functools.partial(activations.Softplus, alpha=10.0), activations.Softplus),
        (keras.activations.tanh, keras.layers.Activation),
    ],
)
def test_any_activation_identifier_gives_one_fresh_layer_per_site(identifier, kind):
    model = models.build(
        "small_cnn", num_classes=10, activation=identifier, input_shape=(16, 16, 3)
    )
    found = _layers(model, kind)
    assert len(found) == len({id(layer) for layer in found}) == 3
    assert _relu_layers(model) == []


@pytest.mark.parametrize("identifier", ["relu", keras.activations.relu])
def test_relu_walk_finds_relus(identifier):
    """The 'no stray ReLU' check above can fail: here every activation is a ReLU."""
    model = models.build(
        "small_cnn", num_classes=10, activation=identifier, input_shape=(16, 16, 3)
    )
    assert len(_relu_layers(model)) == 3


def _perturb(model, seed=0):
    """Randomises every non-kernel weight (BN statistics, zero-init gammas, biases, SmoothReLU's b)
    so that a weight lost on save, or not copied, changes the output. Kernels are random already."""
    rng = np.random.default_rng(seed)
    model.set_weights(
        [
            w
            if w.ndim > 1
            else w * (1 + 0.2 * rng.uniform(-1, 1, w.shape)) + 0.1 * rng.uniform(size=w.shape)
            for w in model.get_weights()
        ]
    )


@pytest.mark.parametrize(
    "name,activation,attribute,value",
    [
        ("resnet20", functools.partial(activations.SmoothReLU, beta_init=5.0), "beta_init", 5.0),
        ("efficientnet_b0", functools.partial(activations.Softplus, alpha=10.0), "alpha", 10.0),
    ],
)
def test_save_load_round_trip(tmp_path, name, activation, attribute, value):
    model = models.build(name, num_classes=10, activation=activation, input_shape=(32, 32, 3))
    _perturb(model)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _pixels(2, 32)
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))
    acts = [layer for layer in loaded.layers if hasattr(layer, attribute)]
    assert acts and {getattr(layer, attribute) for layer in acts} == {value}
    assert loaded.name == name


@functools.cache
def _float32_reference(name):
    """(weights, float32 logits on `_pixels(4, 32)`) of a perturbed float32 model, built once for
    both policies below (under the float32 policy and seed 0 each test starts from)."""
    reference = models.build(name, num_classes=10, input_shape=(32, 32, 3))
    _perturb(reference)
    return reference.get_weights(), np.asarray(reference(_pixels(4, 32), training=False))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("name", ["resnet20", "efficientnet_b0"])
def test_mixed_precision_matches_float32(policy, name):
    weights, expected = _float32_reference(name)
    keras.config.set_dtype_policy(policy)
    model = models.build(name, num_classes=10, input_shape=(32, 32, 3))
    model.set_weights(weights)
    assert model.get_layer("stem_conv").compute_dtype == policy[6:]
    x = _pixels(4, 32)
    logits = model(x, training=False)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    scale = np.abs(expected).max()
    assert (
        np.abs(np.asarray(logits) - expected).max()
        <= (0.005 if policy[6:] == "float16" else 0.03) * scale
    )


def test_same_seed_same_weights_different_activation():
    keras.utils.set_random_seed(1)
    silu = models.build("resnet20", num_classes=10, activation="silu")
    keras.utils.set_random_seed(1)
    gelu = models.build("resnet20", num_classes=10, activation="gelu")
    for a, b in zip(silu.get_weights(), gelu.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = _pixels(2, 32)
    diff = np.abs(np.asarray(silu(x, training=False)) - np.asarray(gelu(x, training=False)))
    assert diff.max() > 1e-3 * np.abs(np.asarray(silu(x, training=False))).max()


@pytest.mark.backends
def test_bad_arguments():
    with pytest.raises(ValueError, match=r"Valid names: .*efficientnet_b0.*resnet50.*small_cnn"):
        models.build("resnet51", num_classes=10)
    with pytest.raises(ValueError, match="Unknown activation"):
        models.build("small_cnn", num_classes=10, activation="relu7")
    with pytest.raises(TypeError):
        models.build("resnet20", num_classes=10, width=3)
    with pytest.raises(ValueError, match="has no dropout"):
        models.build("resnet20", num_classes=10, dropout_rate=0.3)


# Tiny zoo models saved under TensorFlow (`<name>.keras`) and under JAX (`<name>.jax.keras`),
# with the logits TensorFlow computed: tests/data/make_backend_models.py.
BACKEND_MODELS = pathlib.Path(__file__).parent / "data" / "backend_models"


@pytest.mark.backends
@pytest.mark.parametrize("file", sorted(p.name for p in BACKEND_MODELS.glob("*.keras")))
def test_a_model_saved_under_any_backend_loads_with_its_logits(file, tmp_path):
    arrays = np.load(BACKEND_MODELS.parent / "backend_models.npz")
    images, expected = arrays["images"], arrays[file.split(".")[0]]
    model = saving.load_model(BACKEND_MODELS / file)
    logits = keras.ops.convert_to_numpy(model(images, training=False))
    atol = 1e-5 * np.abs(expected).max()  # 1e-5 relative to the logits' scale
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=atol)
    if not file.startswith("small_cnn"):
        return  # saving under this backend: once, on the small model (a load costs seconds here)
    # ... and saved again under this backend, it loads with the same logits.
    model.save(tmp_path / file)
    again = saving.load_model(tmp_path / file)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again(images, training=False)), logits)


@pytest.mark.backends
def test_the_backends_compute_the_same_logits_from_the_same_weights():
    # The fixture script drew the weights from NumPy under each backend: same model, same numbers.
    arrays = np.load(BACKEND_MODELS.parent / "backend_models.npz")
    names = [key[len("jax/") :] for key in arrays.files if key.startswith("jax/")]
    assert names
    for name in names:
        expected = arrays[name]
        np.testing.assert_allclose(
            arrays[f"jax/{name}"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
        )
