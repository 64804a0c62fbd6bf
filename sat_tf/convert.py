"""Make an existing Keras model SAT-ready: replace every ReLU with a smooth activation.

`convert_activations` rebuilds a Functional or Sequential model with every ReLU (ReLU layers,
including ReLU6-style ones, `Activation("relu")`, and `activation="relu"` fused into Conv/Dense
layers) replaced by a fresh smooth-activation layer, carrying the weights over. The result can be
fine-tuned with `sat_tf.AdversarialModel`, e.g. a `keras.applications` network.
"""

import keras

from sat_tf import activations


def convert_activations(model, activation="silu", *, keep_weights=True):
    """Returns a copy of `model` with every ReLU replaced by `activation`.

    Args:
        model: A Functional or Sequential `keras.Model` (nested ones are converted too).
        activation: Any identifier `sat_tf.activations.get` accepts.
        keep_weights: Copy the weights of every kept layer into the new model.

    Raises:
        TypeError: For subclassed models, whose `call` cannot be rebuilt layer by layer.
    """
    factory = activations.get(activation)
    if isinstance(model, keras.Sequential):
        model = _as_functional(model)
    if not _is_functional(model):
        raise TypeError(
            f"convert_activations needs a Functional or Sequential model; {type(model).__name__} "
            "is a subclassed model whose call() is Python code that cannot be rebuilt layer by "
            "layer. Build it with an `activation=` argument instead (as sat_tf.models does)."
        )
    fused = set()

    def clone(layer):
        if isinstance(layer, keras.Model):
            return convert_activations(layer, activation, keep_weights=keep_weights)
        if _is_relu(layer):
            return _make(factory, f"{layer.name}_{_label(activation)}")
        config = layer.get_config()
        if config.get("activation") == "relu":
            config["activation"] = "linear"
            new = type(layer).from_config(config)
            fused.add(id(new))
            return new
        return type(layer).from_config(config)

    def call(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if id(layer) in fused:
            outputs = _make(factory, f"{layer.name}_{_label(activation)}")(outputs)
        return outputs

    converted = keras.models.clone_model(model, clone_function=clone, call_function=call)
    if keep_weights:
        _copy_weights(model, converted)
    return converted


def _is_functional(model):
    return isinstance(model, keras.Model) and type(model).__name__ == "Functional"


def _as_functional(model):
    """A Functional view of a built Sequential model sharing its layers."""
    if not model.built or not model.inputs:
        raise TypeError(
            "convert_activations needs a built Sequential model with an Input; call it on data "
            "or start it with keras.Input(shape) first."
        )
    x = inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    for layer in model.layers:
        x = layer(x)
    return keras.Model(inputs, x, name=model.name)


def _is_relu(layer):
    if isinstance(layer, keras.layers.ReLU):
        return True
    return isinstance(layer, keras.layers.Activation) and layer.get_config()["activation"] == "relu"


def _make(factory, name):
    try:
        return factory(name=name)
    except TypeError:  # a user factory that takes no name
        return factory()


def _label(activation):
    return activation if isinstance(activation, str) else "smooth"


def _copy_weights(source, target):
    by_name = {layer.name: layer for layer in target.layers}
    for layer in source.layers:
        twin = by_name.get(layer.name)
        if twin is None or isinstance(layer, keras.Model) or not layer.weights:
            continue  # replaced ReLUs have no weights; nested models copied their own
        twin.set_weights(layer.get_weights())
