"""Our PGD / APGD-CE / APGD-T / Square against ART (and CleverHans's PGD): strength and speed.

Same model, same examples, same budgets. The model is a small CNN trained for a few seconds on
synthetic separable data (10 classes, each a random prototype image plus noise), so robustness
at the chosen epsilon is neither 0 nor 100%. Needs the bench extras:

    pip install -r requirements-bench.txt
    python benchmarks/compare_art.py --num-examples 256 --image-size 16 --epsilon 16

Prints a Markdown table; the numbers in benchmarks/README.md come from this script.
"""

import argparse
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore")

import common  # noqa: E402 - benchmarks/common.py, next to this script.
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from sat_tf import attacks, autoattack  # noqa: E402

NUM_CLASSES = 10


def make_data(n, size, seed):
    return common.synthetic_data(n, size, seed, separable=True)


def small_cnn(size):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    h = keras.layers.Rescaling(1 / 127.5, -1.0)(inputs)
    for width in (32, 64):
        h = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Dense(NUM_CLASSES)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, h)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*make_data(2048, size, seed=0), epochs=3, batch_size=64, verbose=0)
    return model


def accuracy(model, images, labels):
    logits = np.concatenate([model(images[i : i + 256]) for i in range(0, len(images), 256)])
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def art_classifier(model, size, optimizer=None):
    """ART's wrapper of `model`; with `optimizer`, its `fit` trains (ART's own train step)."""
    from art.estimators.classification import TensorFlowV2Classifier

    return TensorFlowV2Classifier(
        model=model,
        nb_classes=NUM_CLASSES,
        input_shape=(size, size, 3),
        clip_values=(0.0, 255.0),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=optimizer,
    )


def art_apgd(classifier, model, x, y, *, epsilon, steps, batch, targeted_ranks=0):
    """ART's APGD; with targeted_ranks > 0, its targeted DLR on the k-th ranked classes in turn."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    def attack(loss, targeted):
        return AutoProjectedGradientDescent(
            classifier,
            norm=np.inf,
            eps=epsilon,
            eps_step=2 * epsilon,
            max_iter=steps,
            targeted=targeted,
            nb_random_init=1,
            batch_size=batch,
            loss_type=loss,
            verbose=False,
        )

    if not targeted_ranks:
        return attack("cross_entropy", False).generate(x, y)
    adv, ranking = x.copy(), np.argsort(-np.asarray(model(x)), axis=1, kind="stable")
    for rank in range(1, targeted_ranks + 1):
        todo = np.flatnonzero(np.argmax(model(adv), axis=1) == y)
        if len(todo):
            targets = np.eye(NUM_CLASSES)[ranking[todo, rank]]
            found = attack("difference_logits_ratio", True).generate(x[todo], targets)
            fooled = np.argmax(model(found), axis=1) != y[todo]
            adv[todo[fooled]] = found[fooled]
    return adv


class Rows(list):
    """A list that logs each row to stderr as it arrives: the full run takes many minutes."""

    def append(self, row):
        print(f"[compare_art] {row}", file=sys.stderr, flush=True)
        super().append(row)


def pgd10_pair(model, classifier, *, epsilon, batch):
    """(ours, ART's) PGD-10 with the same budget: 10 steps of 2.5 * epsilon / 10, random start.

    Ours is a compiled `(images, labels) -> adversarial` function; ART's is its `ProjectedGradient
    Descent` attack object (call `.generate(x, y)`).
    """
    from art.attacks.evasion import ProjectedGradientDescent

    step = 2.5 * epsilon / 10

    @tf.function(reduce_retracing=True)
    def ours(images, labels):
        return attacks.pgd(
            model, images, labels, epsilon=epsilon, step_size=step, num_steps=10, seed=0
        )

    art = ProjectedGradientDescent(
        classifier,
        norm=np.inf,
        eps=epsilon,
        eps_step=step,
        max_iter=10,
        num_random_init=1,
        batch_size=batch,
        verbose=False,
    )
    return ours, art


def compare(args):
    from art.attacks.evasion import SquareAttack

    model = small_cnn(args.image_size)
    x, y = make_data(args.num_examples, args.image_size, seed=1)
    classifier = art_classifier(model, args.image_size)
    eps, steps, batch = args.epsilon, 100, args.batch_size
    rows = Rows([("clean", accuracy(model, x, y), None)])
    ours_pgd_fn, art_pgd = pgd10_pair(model, classifier, epsilon=eps, batch=batch)
    ours = np.concatenate(
        [ours_pgd_fn(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]
    )
    rows.append(("PGD-10", accuracy(model, ours, y), accuracy(model, art_pgd.generate(x, y), y)))
    rows.append(
        (
            "APGD-CE-100",
            accuracy(model, autoattack.apgd(model, x, y, epsilon=eps), y),
            accuracy(
                model, art_apgd(classifier, model, x, y, epsilon=eps, steps=steps, batch=batch), y
            ),
        )
    )
    ours_t = autoattack.apgd(
        model, x, y, epsilon=eps, loss="dlr", targeted=True, target_classes=args.targets
    )
    art_t = art_apgd(
        classifier, model, x, y, epsilon=eps, steps=steps, batch=batch, targeted_ranks=args.targets
    )
    rows.append(
        (
            f"APGD-T-100 ({args.targets} targets)",
            accuracy(model, ours_t, y),
            accuracy(model, art_t, y),
        )
    )
    ours_sq = autoattack.square(model, x, y, epsilon=eps, num_queries=args.square_queries)
    art_sq = SquareAttack(
        classifier,
        norm=np.inf,
        eps=eps,
        max_iter=args.square_queries,
        p_init=0.8,
        nb_restarts=1,
        batch_size=batch,
        verbose=False,
    ).generate(x, y)
    rows.append(
        (f"Square-{args.square_queries}", accuracy(model, ours_sq, y), accuracy(model, art_sq, y))
    )
    cleverhans = cleverhans_pgd(model, x, y, eps=eps)

    # Speed: one batch, the same model; ours and ART's in turn after an untimed warm-up.
    xb, yb = x[:batch], y[:batch]
    xt, yt = tf.constant(xb), tf.constant(yb)
    t = common.interleave(
        {
            "ours_pgd": lambda: ours_pgd_fn(xt, yt).numpy(),
            "art_pgd": lambda: art_pgd.generate(xb, yb),
            "ours_apgd": lambda: autoattack.apgd(model, xb, yb, epsilon=eps),
            "art_apgd": lambda: art_apgd(
                classifier, model, xb, yb, epsilon=eps, steps=steps, batch=batch
            ),
        },
        repeats=1,
    )
    rate = {name: batch / float(samples[0, 0]) for name, samples in t.items()}
    speed = [
        ("PGD-10", rate["ours_pgd"], rate["art_pgd"]),
        ("APGD-CE-100", rate["ours_apgd"], rate["art_apgd"]),
    ]
    return rows, cleverhans, speed


def cleverhans_pgd10(model, x, y, *, eps):
    """CleverHans's TF2 PGD with `pgd10_pair`'s budget; the adversarial images (NumPy)."""
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    adv = projected_gradient_descent(
        lambda z: model(z, training=False),
        tf.convert_to_tensor(x),
        eps,
        2.5 * eps / 10,
        10,
        np.inf,
        clip_min=0.0,
        clip_max=255.0,
        y=tf.convert_to_tensor(y),
        rand_init=True,
        sanity_checks=False,
    )
    return adv.numpy()


def cleverhans_pgd(model, x, y, *, eps):
    """CleverHans's PGD-10 robust accuracy, or the reason it could not run."""
    try:
        import cleverhans.tf2.attacks.projected_gradient_descent  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure is the result to report.
        return f"cleverhans unavailable: {type(error).__name__}: {error}"
    return accuracy(model, cleverhans_pgd10(model, x, y, eps=eps), y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument(
        "--epsilon", type=float, default=16.0, help="L-inf radius in pixels (0-255)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--targets", type=int, default=9)
    parser.add_argument("--square-queries", type=int, default=1000)
    args = parser.parse_args()
    rows, cleverhans, speed = compare(args)
    print(f"\n{common.machine_line()}; {vars(args)}\n")
    print("| attack | ours: robust acc (%) | ART: robust acc (%) | ours - ART (pp) |")
    print("|---|---|---|---|")
    for name, ours, art in rows:
        diff = "" if art is None else f"{100 * (ours - art):+.2f}"
        art_text = "" if art is None else f"{100 * art:.2f}"
        print(f"| {name} | {100 * ours:.2f} | {art_text} | {diff} |")
    ch = cleverhans if isinstance(cleverhans, str) else f"{100 * cleverhans:.2f}%"
    ours_pgd = f"{100 * rows[1][1]:.2f}%"
    version = common.package_version("cleverhans")
    print(f"\nCleverHans {version} TF2 PGD-10 robust accuracy: {ch} (ours PGD-10: {ours_pgd})\n")
    print(
        f"Speed: one timed call per attack on one batch of {args.batch_size}, after one untimed "
        f"warm-up call, ours and ART's in turn (wall time):\n"
    )
    print(f"| attack (batch {args.batch_size}) | ours (images/s) | ART (images/s) | speed-up |")
    print("|---|---|---|---|")
    for name, ours, art in speed:
        print(f"| {name} | {ours:.1f} | {art:.1f} | {ours / art:.1f}x |")


if __name__ == "__main__":
    main()
