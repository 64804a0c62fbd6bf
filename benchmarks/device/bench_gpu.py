"""ResNet-50 at 224 px, bfloat16, under the JAX backend on one GPU (benchmarks/device/README.md).

Needs only JAX, Keras and sat_tf (no TensorFlow). Synthetic data throughout. Measured, in this
order, each section only while the time guard (`--budget-s`) leaves room for it:

  1. train steps, `model.train_on_batch` on one fixed batch under the `mixed_bfloat16` policy:
     clean ReLU, PGD-1 ReLU (`sat_tf.AdversarialModel`, the paper's recipe: epsilon 4, step 4,
     1 step, 20% clean starts, keyed random starts), PGD-1 SiLU, then clean SiLU. The candidates
     are timed in turn (A B C ... after an untimed warm-up round, the order rotated each round);
     images/s from the median time per step, and each ratio (PGD-1 / clean, SiLU / ReLU) is the
     median of the per-round ratios.
  2. standard AutoAttack (`sat_tf.autoattack.auto_attack`, epsilon 4/255) on `--aa-images`
     synthetic images against the ReLU ResNet-50 of section 1 after its few timed clean steps
     (an untrained network), with its own predictions as labels, so that every image enters the
     first stage; the stage counts say how many images each later stage attacked. Wall time,
     compilation included, and images/s.

Results go to `<out>/bench_gpu.json` after every section (a run cut short keeps what it measured)
and a Markdown summary to `<out>/bench_gpu.md`. `--tiny` is a CPU smoke run at 32 px.
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import threading
import time
import traceback

import numpy as np

STEPS = ("relu clean", "relu pgd1", "silu pgd1", "silu clean")  # in order of importance


class Guard:
    """The run's deadline: sections ask `left()`; a watchdog ends the process past `hard_s`."""

    def __init__(self, budget_s, hard_s, on_timeout):
        self.start, self.budget_s = time.perf_counter(), budget_s

        def stop():
            on_timeout()
            os._exit(3)  # a compilation cannot be interrupted any other way

        self.timer = threading.Timer(hard_s, stop)
        self.timer.daemon = True
        self.timer.start()

    def elapsed(self):
        return time.perf_counter() - self.start

    def left(self):
        return self.budget_s - self.elapsed()


def log(guard, message):
    print(f"[bench_gpu {guard.elapsed():6.0f}s] {message}", file=sys.stderr, flush=True)


def build_step(name, *, model_name, image_size, batch_size):
    """(classifier, zero-argument step, first-call seconds) of candidate "<act> clean|pgd1"."""
    import keras

    from sat_tf import AdversarialModel, models

    activation, kind = name.split()
    keras.utils.set_random_seed(0)
    classifier = models.build(
        model_name, num_classes=1000, activation=activation, input_shape=(image_size,) * 2 + (3,)
    )
    model = classifier
    if kind == "pgd1":
        model = AdversarialModel(classifier, epsilon=4.0, step_size=4.0, num_steps=1, seed=0)
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
    y = rng.integers(0, 1000, batch_size).astype("int32")
    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)

    def step():
        return model.train_on_batch(x, y)  # host floats: the step has finished

    start = time.perf_counter()
    step()
    return classifier, step, time.perf_counter() - start


def time_steps(guard, args, results, save):
    """Section 1: builds the candidates the guard allows, then times them in turn."""
    steps, classifiers = {}, {}
    results["first_call_s"], results["step_s"], results["errors"] = {}, {}, {}
    for name in STEPS:
        if guard.left() < args.compile_reserve_s:
            log(guard, f"skipping {name}: {guard.left():.0f} s left")
            continue
        log(guard, f"building and compiling {name}")
        try:
            classifiers[name], steps[name], first = build_step(
                name, model_name=args.model, image_size=args.image_size, batch_size=args.batch_size
            )
        except Exception:  # noqa: BLE001 - recorded; the other candidates still run
            results["errors"][name] = traceback.format_exc(limit=6)
            log(guard, f"{name} failed:\n{results['errors'][name]}")
            continue
        results["first_call_s"][name] = first
        results["step_s"][name] = []
        save()
    names = list(steps)
    for round_index in range(args.warmup + args.repeats):
        if round_index > args.warmup and guard.left() < args.aa_reserve_s:
            log(guard, f"stopping after {round_index - args.warmup} timed rounds")
            break
        shift = round_index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(args.calls):
                steps[name]()
            if round_index >= args.warmup:
                results["step_s"][name].append((time.perf_counter() - start) / args.calls)
        save()
    return classifiers.get("relu clean")


def autoattack(guard, args, results, classifier):
    """Section 2: standard AutoAttack on synthetic images, labelled by the model itself."""
    import keras

    from sat_tf import autoattack as aa
    from sat_tf import models

    if classifier is None:
        keras.utils.set_random_seed(0)
        classifier = models.build(
            args.model,
            num_classes=1000,
            activation="relu",
            input_shape=(args.image_size,) * 2 + (3,),
        )
    rng = np.random.default_rng(1)
    shape = (args.aa_images, args.image_size, args.image_size, 3)
    images = rng.uniform(0, 255, shape).astype("float32")
    logits = classifier.predict(images, batch_size=args.aa_batch_size, verbose=0)
    labels = np.argmax(logits, -1).astype("int32")
    start = time.perf_counter()
    result = aa.auto_attack(
        classifier,
        images,
        labels,
        epsilon=args.aa_epsilon,
        version=args.aa_version,
        batch_size=args.aa_batch_size,
        seed=0,
    )
    wall = time.perf_counter() - start
    results["autoattack"] = {
        "version": args.aa_version,
        "images": args.aa_images,
        "wall_s": wall,
        "images_per_s": args.aa_images / wall,
        "robust_after": {k: round(v * args.aa_images) for k, v in result.stages.items()},
        "distinct_labels": int(len(np.unique(labels))),
    }


def info(args):
    import jax
    import keras

    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {getattr(device, 'device_kind', device)}",
        "devices": len(jax.devices()),
        "versions": f"Python {platform.python_version()}, JAX {jax.__version__}, Keras "
        f"{keras.__version__}, NumPy {np.__version__}",
        "tensorflow_imported": "tensorflow" in sys.modules,
        "args": vars(args),
    }


def summary(results):
    """Markdown: the step table, the ratios, the AutoAttack line."""
    args = results["info"]["args"]
    lines = [
        f"Device: {results['info']['device']}; {results['info']['versions']}; {args['model']} at "
        f"{args['image_size']} px, batch {args['batch_size']}, mixed_bfloat16, synthetic data; "
        f"{len(next(iter(results.get('step_s', {}).values()), []))} timed rounds of "
        f"{args['calls']} steps; {results.get('elapsed_s', 0):.0f} s in all.",
        "",
        "| step | ms (median) | images/s | first call s |",
        "|---|---|---|---|",
    ]
    step_s = {k: np.array(v) for k, v in results.get("step_s", {}).items() if v}
    for name, s in step_s.items():
        ms = 1e3 * float(np.median(s))
        first = results["first_call_s"][name]
        lines.append(f"| {name} | {ms:.1f} | {args['batch_size'] / ms * 1e3:.0f} | {first:.0f} |")
    lines += ["", "| ratio | median of per-round ratios | range |", "|---|---|---|"]
    for label, top, bottom in (
        ("PGD-1 / clean, ReLU", "relu pgd1", "relu clean"),
        ("PGD-1 / clean, SiLU", "silu pgd1", "silu clean"),
        ("SiLU / ReLU, PGD-1", "silu pgd1", "relu pgd1"),
        ("SiLU / ReLU, clean", "silu clean", "relu clean"),
    ):
        if top in step_s and bottom in step_s:
            n = min(len(step_s[top]), len(step_s[bottom]))
            r = step_s[top][:n] / step_s[bottom][:n]
            lines.append(f"| {label} | **{np.median(r):.3f}** | {r.min():.3f}-{r.max():.3f} |")
    for name, error in results.get("errors", {}).items():
        lines.append(f"\n{name} failed: {error.strip().splitlines()[-1]}")
    a = results.get("autoattack")
    if a:
        lines += [
            "",
            f"AutoAttack {a['version']}, {a['images']} images: {a['wall_s']:.0f} s "
            f"(compilation included), **{a['images_per_s']:.2f} images/s**; robust after each "
            f"stage: {a['robust_after']}.",
        ]
    elif "autoattack_error" in results:
        lines.append(f"\nAutoAttack failed: {results['autoattack_error'].strip().splitlines()[-1]}")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: small_cnn, 32 px, batch 4")
    p.add_argument("--model", help="sat_tf.models name (default resnet50; --tiny: small_cnn)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--calls", type=int, default=5, help="steps per timing")
    p.add_argument("--aa-images", type=int, default=256, help="0: no AutoAttack")
    p.add_argument("--aa-batch-size", type=int, default=256)
    p.add_argument("--aa-version", default="standard")
    p.add_argument("--aa-epsilon", type=float, default=4.0, help="pixels")
    p.add_argument("--budget-s", type=float, default=420, help="no new section after this")
    p.add_argument("--hard-s", type=float, default=450, help="the process ends here regardless")
    p.add_argument("--compile-reserve-s", type=float, default=150, help="left to add a step")
    p.add_argument("--aa-reserve-s", type=float, default=150, help="left to start AutoAttack")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    args = p.parse_args(argv)
    if args.tiny:
        args.model = args.model or "small_cnn"  # ResNet-50 takes minutes to compile on a CPU
        args.image_size, args.batch_size, args.repeats, args.calls = 32, 4, 2, 1
        args.aa_images, args.aa_batch_size, args.aa_version = 8, 8, "fast"
        args.compile_reserve_s = args.aa_reserve_s = 0
        args.budget_s, args.hard_s = 3600, 3600  # a loaded CPU compiles slowly
    args.model = args.model or "resnet50"
    return args


def main(argv=None):
    args = parse(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}

    def save():
        tmp = out / "bench_gpu.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out / "bench_gpu.json")

    guard = Guard(args.budget_s, args.hard_s, lambda: (log(guard, "time is up"), save()))
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16")
    results["info"] = info(args)
    log(guard, json.dumps(results["info"]))
    classifier = time_steps(guard, args, results, save)
    if args.aa_images and guard.left() >= args.aa_reserve_s:
        log(guard, f"AutoAttack {args.aa_version} on {args.aa_images} images")
        try:
            autoattack(guard, args, results, classifier)
        except Exception:  # noqa: BLE001 - recorded beside the step results
            results["autoattack_error"] = traceback.format_exc(limit=6)
            log(guard, results["autoattack_error"])
    results["elapsed_s"] = guard.elapsed()
    results["info"]["tensorflow_imported"] = "tensorflow" in sys.modules
    save()
    text = summary(results)
    (out / "bench_gpu.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
