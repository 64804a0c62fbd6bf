"""The study's report: docs/study.md's generated section of an arm and its two plots.

`python tools/study.py --report` calls `write_report(load_results(...), "docs", ...)`; the prose
of docs/study.md outside the generated markers is kept.
"""

import json
from pathlib import Path

BEGIN, END = "<!-- study:generated -->", "<!-- /study:generated -->"  # the CIFAR-10 arm's section


def markers(arm):
    """The (begin, end) comments around an arm's generated section of docs/study.md."""
    if arm == "cifar10":
        return BEGIN, END
    return f"<!-- study:{arm}:generated -->", f"<!-- /study:{arm}:generated -->"


def _count(n):
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def columns(protocol):
    """(metric key, header) of the table; the headers say on how many test images."""
    full, subset = _count(protocol["full_examples"]), _count(protocol["subset_examples"])
    return (
        ("clean", f"clean ({full})"),
        ("pgd20", f"PGD-20 ({full})"),
        ("pgd50x2", f"PGD-50x2 ({full})"),
        ("autoattack", f"AutoAttack-{protocol['autoattack_version']} ({subset})"),
    )


def load_results(results, *, version):
    """row -> list of the result records of protocol `version`, from `results/*_s*.json`."""
    table = {}
    for path in sorted(Path(results).glob("*_s*.json")):
        record = json.loads(path.read_text())
        if record["eval_protocol"].get("version", 1) != version:
            continue  # pending re-evaluation; `missing_markdown` lists it
        table.setdefault(record["row"], []).append(record)
    return table


def standard_aa_markdown(standard, rows, base="relu"):
    """Standard AutoAttack next to the run's AutoAttack-fast (same model, same images).

    `standard`: `load_results` of the standard-AutoAttack folder (`tools/study.py --run
    --autoattack_standard`).
    """
    if not standard:
        return ""
    n = next(iter(standard.values()))[0]["num_examples"]
    by_seed = {r["seed"]: r["autoattack"] for r in standard.get(base, [])}
    records = [r for runs in standard.values() for r in runs]
    if all("fab-t" in r.get("stages", {}) for r in records):
        title, column = "Standard AutoAttack", "AutoAttack standard"
    else:  # Result files whose stages have no FAB-T: run without it, Square's p schedule rescaled.
        title = (
            "AutoAttack with the standard budgets but without FAB-T and with Square's p schedule "
            "rescaled to 10,000 queries (not the reference ensemble)"
        )
        column = "AutoAttack std. budgets, no FAB-T"
    lines = [
        f"{title}, on the same {n:,} images as AutoAttack-fast "
        f"(`python tools/study.py --run --autoattack_standard`; mean +- std over seeds, %):",
        "",
        f"| row | seeds | AutoAttack-fast | {column} | difference to fast | "
        f"difference to {base} (paired) | min/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in [r for r in rows if r in standard]:
        runs = sorted(standard[row], key=lambda r: r["seed"])
        pairs = [r["autoattack"] - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]
        cells = [
            row,
            ",".join(str(r["seed"]) for r in runs),
            _cell([r["autoattack_fast"] for r in runs]),
            _cell([r["autoattack"] for r in runs]),
            _cell([r["autoattack"] - r["autoattack_fast"] for r in runs], signed=True),
            _cell(pairs, signed=True) if pairs and row != base else "",
            f"{sum(r['seconds'] for r in runs) / 60 / len(runs):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_std(values):
    """(mean, sample std) in percent; std is nan for a single value."""
    import numpy as np

    values = 100 * np.asarray(values, dtype=float)
    std = values.std(ddof=1) if len(values) > 1 else float("nan")
    return float(values.mean()), float(std)


def _cell(values, signed=False):
    mean, std = mean_std(values)
    mean = round(mean, 1) + 0.0  # no "-0.0"
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text if std != std else f"{text} +- {std:.1f}"


def table_markdown(table, rows, protocol):
    """One line per row with results: n, mean +- std of each `columns` metric, warnings, time."""
    metrics = columns(protocol)
    head = ["row", "activation", "n"] + [h for _, h in metrics] + ["masking warns", "min/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in [r for r in rows if r in table]:
        runs = table[row]
        cells = [_cell([r["metrics"][key] for r in runs]) for key, _ in metrics]
        warns = sum(c["status"] == "warn" for r in runs for c in r["metrics"]["checks"])
        minutes = sum(r["wall_time_s"]["train"] + r["wall_time_s"]["eval"] for r in runs)
        act = runs[0]["config"]["activation"]
        if act == "smooth_grad_relu":
            act += " (" + "+".join(runs[0]["config"]["smooth_gradients"]) + ")"
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        line = [row, act, f"{len(runs)} (s{seeds})", *cells, str(warns)]
        lines.append("| " + " | ".join(line + [f"{minutes / 60 / len(runs):.1f}"]) + " |")
    return "\n".join(lines)


def paired_markdown(table, rows, protocol, base="relu"):
    """Row minus `base` at the same seed (clean, PGD-20, AutoAttack): seed noise cancels."""
    if base not in table:
        return ""
    by_seed = {r["seed"]: r["metrics"] for r in table[base]}
    keys = ("clean", "pgd20", "autoattack")
    heads = [h for key, h in columns(protocol) if key in keys]
    lines = [
        f"| row | seeds paired with {base} | " + " | ".join(f"{h} - {base}" for h in heads) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for row in [r for r in rows if r in table and r != base]:
        pairs = [(r["metrics"], by_seed[r["seed"]]) for r in table[row] if r["seed"] in by_seed]
        if not pairs:
            continue
        cells = [_cell([a[k] - b[k] for a, b in pairs], signed=True) for k in keys]
        lines.append(f"| {row} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def missing_markdown(table, rows, seeds):
    """The (row, seed) runs without a result, seed-major like the queue."""
    done = {(r["row"], r["seed"]) for runs in table.values() for r in runs}
    missing = [f"{row} s{seed}" for seed in seeds for row in rows if (row, seed) not in done]
    if not missing:
        return "Every row has every seed."
    return f"Not yet run ({len(missing)}): " + ", ".join(missing) + "."


def plot_curves(table, path, rows, title):
    """Robust accuracy (PGD-20 on the subset) vs epsilon, mean over seeds, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate([r for r in rows if r in table]):
        runs = table[row]
        epsilons = [0.0] + sorted(float(e) for e in runs[0]["metrics"]["curve"])
        stats = [mean_std([r["metrics"]["subset_clean"] for r in runs])] + [
            mean_std([r["metrics"]["curve"][str(e)] for r in runs]) for e in epsilons[1:]
        ]
        means = [m for m, _ in stats]
        errors = [0 if s != s else s for _, s in stats]
        style = "--" if row.startswith(("clean", "smoothgrad")) else "-"
        color = plt.cm.tab20(i % 20)  # 11 rows: more colours than the default cycle's 10
        ax.errorbar(
            epsilons, means, yerr=errors, label=row, marker="o", ls=style, capsize=2, color=color
        )
    ax.set(xlabel="epsilon (pixels of 255)", ylabel="accuracy under PGD-20 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scatter(table, path, rows, *, title, epsilon):
    """Clean vs PGD-20 accuracy (all test images), mean +- std over seeds, one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in [r for r in rows if r in table and r != "clean_relu"]:
        runs = table[row]
        cx, sx = mean_std([r["metrics"]["clean"] for r in runs])
        cy, sy = mean_std([r["metrics"]["pgd20"] for r in runs])
        ax.errorbar(
            cx,
            cy,
            xerr=0 if sx != sx else sx,
            yerr=0 if sy != sy else sy,
            marker="s" if row.startswith("smoothgrad") else "o",
            capsize=2,
        )
        ax.annotate(row, (cx, cy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for get, put in ((ax.get_xlim, ax.set_xlim), (ax.get_ylim, ax.set_ylim)):
        low, high = get()  # at least 4 points wide: no zooming 0.2-point gaps into a trend
        middle, half = (low + high) / 2, max((high - low) / 2, 2.0)
        put(middle - half, middle + half)
    ax.set(xlabel="clean accuracy (%)", ylabel=f"PGD-20 accuracy at eps {epsilon:g} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    table, docs, *, rows, seeds, protocol, arm="cifar10", data="CIFAR-10", standard=None
):
    """Rewrites the arm's generated section of docs/study.md and its plots; the prose is kept.

    `standard`: the standard-AutoAttack results (`standard_aa_markdown`), shown when there are any.
    """
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    begin, end = markers(arm)
    stem = "study" if arm == "cifar10" else f"study_{arm}"
    full, subset = protocol["full_examples"], protocol["subset_examples"]
    plot_curves(
        table,
        docs / f"{stem}_epsilon.png",
        rows,
        f"{data}, small_cnn, {subset:,} test images (eps 0 = clean)",
    )
    plot_scatter(
        table,
        docs / f"{stem}_scatter.png",
        rows,
        epsilon=protocol["epsilon"],
        title=f"{data}, adversarial rows, {full:,} test images",
    )
    checks = sorted(
        {
            c["name"]
            for runs in table.values()
            for r in runs
            for c in r["metrics"]["checks"]
            if c["status"] == "warn"
        }
    )
    folder = "results/study/" + ("" if arm == "cifar10" else f"{arm}/")
    parts = [
        begin,
        f"Generated by `python tools/study.py --report` from {sum(map(len, table.values()))} "
        f"result files in `{folder}`. Accuracies in %, mean +- sample std over seeds.",
        table_markdown(table, rows, protocol),
        "Paired with ReLU at the same seed (percentage points, mean +- std over the pairs):",
        paired_markdown(table, rows, protocol),
        missing_markdown(table, rows, seeds),
        standard_aa_markdown(standard or {}, rows),
        "Masking checks that warned in some run: " + (", ".join(checks) or "none") + ".",
        f"![robust accuracy vs epsilon]({stem}_epsilon.png) ![clean vs robust]({stem}_scatter.png)",
        end,
    ]
    generated = "\n\n".join(part for part in parts if part)
    path = docs / "study.md"
    text = path.read_text() if path.exists() else "# CPU-scale SAT study\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    path.write_text(head + generated + rest.split(end, 1)[1])
