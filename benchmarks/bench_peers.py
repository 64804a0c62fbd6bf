"""Section 3 of `make bench`: sat_tf against the libraries a user would pick instead.

* Adversarial training: our `AdversarialModel.fit` against ART's `AdversarialTrainerMadryPGD`
  (Adversarial Robustness Toolbox, `TensorFlowV2Classifier`), same Keras model (ResNet-20),
  same data, same attack (PGD-1, epsilon = step = 4 pixels, one random start), images/s.
* Attack throughput: PGD-10 (ours, ART, CleverHans) and APGD-CE-100 (ours, ART) on the
  small CNN and data of `compare_art.py`, batch 128.
* Where each attack's time goes: as many full-batch input gradients as the attack takes (10 for
  PGD-10, 100 for APGD-CE-100), each called on its own, our compiled form against ART's eager
  one, against the whole attack.

Needs requirements-bench.txt. Run alone: python benchmarks/bench_peers.py [--repeats 3].
"""

import argparse
import warnings

import common
import compare_art
import keras
import numpy as np
import tensorflow as tf

from sat_tf import attacks, autoattack

warnings.filterwarnings("ignore")  # ART's deprecation chatter.


def _training_pair(args):
    """(ours, ART) zero-argument callables, each training one epoch over the same data."""
    from art.defences.trainer import AdversarialTrainerMadryPGD

    size, n, batch = args.small_image_size, args.peer_examples, args.peer_batch_size
    images, labels = (t.numpy() for t in common.random_batch(n, size))
    attack = {"epsilon": 4.0, "step_size": 4.0, "random_start": True}
    ours = common.build_model(
        "resnet20", image_size=size, num_steps=1, prob_start_from_clean=0.0, **attack
    )
    classifier = common.build_model("resnet20", image_size=size)  # Same seed: same weights.
    art_model = compare_art.art_classifier(classifier, size, optimizer=classifier.optimizer)
    trainer = AdversarialTrainerMadryPGD(
        art_model, nb_epochs=1, batch_size=batch, eps=4.0, eps_step=4.0, max_iter=1
    )
    return {
        "ours": lambda: ours.fit(images, labels, batch_size=batch, epochs=1, verbose=0),
        "ART": lambda: trainer.fit(images, labels, nb_epochs=1, batch_size=batch),
    }


def training(args):
    """Images/s of adversarial training, ours against ART's."""
    samples = common.interleave(_training_pair(args), repeats=args.peer_repeats)
    n = args.peer_examples
    wall, cpu = common.ratio(samples["ART"], samples["ours"])
    rate = {name: n / common.median_ms(s)[0] * 1e3 for name, s in samples.items()}
    row = (
        f"PGD-1 training, resnet20 {args.small_image_size} px, batch {args.peer_batch_size}",
        f"{rate['ours']:.1f}",
        f"{rate['ART']:.1f}",
        f"**{wall:.1f}x**",
        f"{cpu:.1f}x",
        common.goal_cell(
            common.GOAL_TRAINING_SPEEDUP, (wall, cpu), at_most=False, digits=1, unit="x"
        ),
    )
    return {"samples": samples, "speedup": (wall, cpu)}, row


def _attack_candidates(model, classifier, x, y, eps):
    ours_pgd, art_pgd = compare_art.pgd10_pair(model, classifier, epsilon=eps, batch=len(y))
    xt, yt = tf.constant(x), tf.constant(y)
    pgd = {
        "ours": lambda: ours_pgd(xt, yt).numpy(),
        "ART": lambda: art_pgd.generate(x, y),
        "CleverHans": lambda: compare_art.cleverhans_pgd10(model, xt, yt, eps=eps),
    }
    apgd = {
        "ours": lambda: autoattack.apgd(model, x, y, epsilon=eps),
        "ART": lambda: compare_art.art_apgd(
            classifier, model, x, y, epsilon=eps, steps=100, batch=len(y)
        ),
    }
    return pgd, apgd


def _gradient_candidates(model, classifier, x, y):
    """10 input gradients: ours compiled, and ART's eager `loss_gradient` (what its PGD calls)."""
    xt, yt = tf.constant(x), tf.constant(y)
    onehot = tf.constant(np.eye(compare_art.NUM_CLASSES, dtype=np.float32)[y])
    compiled = tf.function(lambda a, b: attacks.input_gradient(model, a, b)[1])
    return {
        "ours 10 gradients": lambda: [compiled(xt, yt).numpy() for _ in range(10)],
        "ART 10 gradients": lambda: [
            classifier.loss_gradient(xt, onehot).numpy() for _ in range(10)
        ],
    }


def attack_throughput(args):
    """PGD-10 and APGD-CE-100 images/s, and where the time goes. Returns (results, rows, text).

    The 10-gradient profiles run in the same rounds as the attacks, so that their shares
    of each attack are side by side too.
    """
    size, batch, eps = args.attack_image_size, args.attack_batch_size, args.attack_epsilon
    model = compare_art.small_cnn(size)
    x, y = compare_art.make_data(batch, size, seed=1)
    classifier = compare_art.art_classifier(model, size)
    pgd, apgd = _attack_candidates(model, classifier, x, y, eps)
    gradients = _gradient_candidates(model, classifier, x, y)
    t_pgd = common.interleave({**pgd, **gradients}, repeats=args.peer_repeats)
    t_apgd = common.interleave({**apgd, **gradients}, repeats=args.peer_repeats)
    rows, speedups = [], {}
    for name, samples, peers in (
        ("PGD-10", t_pgd, ("ART", "CleverHans")),
        ("APGD-CE-100", t_apgd, ("ART",)),
    ):
        rate = {k: batch / common.median_ms(s)[0] * 1e3 for k, s in samples.items()}
        for peer in peers:
            wall, cpu = common.ratio(samples[peer], samples["ours"])
            if peer == "ART":
                speedups[name] = wall
                goal = common.goal_cell(
                    common.GOAL_ATTACK_SPEEDUP, (wall, cpu), at_most=False, digits=1, unit="x"
                )
            rows.append(
                (
                    f"{name} attack, small CNN {size} px, batch {batch}, vs {peer}",
                    f"{rate['ours']:.1f}",
                    f"{rate[peer]:.1f}",
                    f"**{wall:.1f}x**",
                    f"{cpu:.1f}x",
                    goal if peer == "ART" else "(context)",
                )
            )
    blocks = {"PGD-10": (t_pgd, 1), "APGD-CE-100": (t_apgd, 10)}
    text = attack_profile(blocks, batch, speedups)
    return {"pgd": t_pgd, "apgd": t_apgd}, rows, text


def _per_attack(values):
    """'PGD-10 3.5x, APGD-CE-100 4.1x' from {attack: ratio}."""
    return ", ".join(f"{k} {v:.1f}x" for k, v in values.items())


def _shares(values, first, then):
    """'78% of ART's PGD-10 time and 57% of its APGD-CE-100 time' from {attack: fraction}."""
    owners = [first] + [then] * (len(values) - 1)
    return " and ".join(
        f"{100 * v:.0f}% of {owner} {k} time"
        for owner, (k, v) in zip(owners, values.items(), strict=True)
    )


def attack_profile(blocks, batch, speedups):
    """Each attack's time against its gradients, as a table and a paragraph.

    Args:
        blocks: {attack: (samples, gradient calls / 10)}.
        batch: Batch size, for the header.
        speedups: {attack: ART's time / ours, wall}, as the section's first table prints them.

    Every number in the paragraph is one of this run's ratios (wall, median of the per-round
    ratios); the paragraph judges nothing that it does not compute.
    """
    rows, eager, share, to_gradients = [], {}, {"ours": {}, "ART": {}}, {}
    for name, (t, tens) in blocks.items():
        grads = {"ours": t["ours 10 gradients"] * tens, "ART": t["ART 10 gradients"] * tens}
        eager[name] = common.ratio(grads["ART"], grads["ours"])[0]
        to_gradients[name] = common.ratio(t["ART"], grads["ours"])[0]
        for who, kind in (("ours", "compiled"), ("ART", "eager")):
            share[who][name] = common.ratio(grads[who], t[who])[0]
            rows.append(
                (
                    f"{name}, {who}: {10 * tens} x {kind} full-batch input gradient",
                    f"{common.median_ms(grads[who])[0]:.0f}",
                    f"{common.median_ms(t[who])[0]:.0f}",
                    f"{100 * share[who][name]:.0f}%",
                )
            )
    header = (f"where the time goes (batch {batch})", "gradients ms", "whole attack ms", "share")
    printed = {f"{v:.1f}x" for v in eager.values()}
    if len(printed) == 1:  # One value, not a range of identical ends.
        eager_text = f"{printed.pop()} our compiled one, in the {' and '.join(eager)} rounds"
    else:
        first, *rest = (f"{v:.1f}x in the {k} rounds" for k, v in eager.items())
        eager_text = " and ".join([first.replace("x in", "x our compiled one in"), *rest])
    art_shares = _shares(share["ART"], "ART's", "its")
    art = (
        f"ART's eager `loss_gradient` (Keras layers dispatched op by op from Python, plus tape "
        f"bookkeeping) costs {eager_text}. As many of its gradients, each called on its own, "
        f"take {art_shares}"
    )
    if all(round(100 * v) < 100 for v in share["ART"].values()):
        art += (
            "; the rest is its other per-step eager/NumPy work (random start, sign, projection, "
            "clipping; APGD's step-size and checkpoint logic)"
        )
    ours = (
        f"As many of our compiled gradients, each called on its own, take "
        f"{_shares(share['ours'], 'our', 'our')} (APGD may compute fewer: fooled examples "
        f"leave the batch at checkpoints)"
    )
    over = [k for k, v in share["ours"].items() if round(100 * v) > 100]
    if over:
        ours += (
            f"; above 100% ({', '.join(over)}), our whole attack took less time than as many "
            f"separately called gradients"
        )
    ratios = (
        f"ART's whole attack / as many of our separately called compiled gradients: "
        f"{_per_attack(to_gradients)}; the speed-up over ART (first table of this section) "
        f"divides by our whole attack instead: {_per_attack(speedups)}"
    )
    text = common.table(header, rows) + "\n\n" + ". ".join((art, ours, ratios)) + "."
    return text


def peers(args):
    """Section 3: returns (results, Markdown)."""
    train_results, train_row = training(args)
    attack_results, attack_rows, profile_text = attack_throughput(args)
    header = ("comparison", "ours images/s", "peer images/s", "speed-up wall", "CPU", "goal")
    text = common.table(header, [train_row, *attack_rows]) + "\n\n" + profile_text
    return {"training": train_results, "attacks": attack_results}, text


def add_arguments(parser):
    parser.add_argument("--peer-repeats", type=int, default=3)
    parser.add_argument("--peer-examples", type=int, default=64, help="images per training run")
    parser.add_argument("--peer-batch-size", type=int, default=32)
    parser.add_argument("--attack-image-size", type=int, default=16)
    parser.add_argument("--attack-batch-size", type=int, default=128)
    parser.add_argument("--attack-epsilon", type=float, default=16.0, help="pixels (0-255)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--small-image-size", type=int, default=32)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    print(common.machine_line() + "\n")
    print(peers(args)[1])


if __name__ == "__main__":
    main()
