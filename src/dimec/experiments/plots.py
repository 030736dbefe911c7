"""The paper's figures from our runs: pool proportions (Fig. 3), individual-device accuracy (Fig. 4a),
t-SNE of the pools (Fig. 4b/c), the accuracy-vs-cost Pareto plot, the cost ablations (Fig. 5) and each exit's
reliability diagram before and after temperature scaling.
Matplotlib with the Agg backend: PNG files, no display needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dimec.experiments import DISPLAY
from dimec.tiers import POOLS as POOL_NAMES
from dimec.tiers import TIERS

POOLS = tuple(f"{p} ({t})" for p, t in zip(POOL_NAMES, TIERS, strict=True))  # legend labels
COLORS = ("tab:green", "tab:orange", "tab:red")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def plot_pool_proportions(shares: dict[str, np.ndarray], path: Path) -> Path:
    """shares: {task: (3,) share of validation samples in the easy, medium, hard pool}. Stacked bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.4 * len(shares) + 3, 4))
    tasks = list(shares)
    bottom = np.zeros(len(tasks))
    for k in range(3):
        values = np.array([100 * shares[t][k] for t in tasks])
        ax.bar(tasks, values, bottom=bottom, color=COLORS[k], label=POOLS[k])
        bottom += values
    ax.set_ylabel("share of validation samples (%)")
    ax.set_xlabel("task")
    ax.set_ylim(0, 100)
    ax.set_title("DIMEC-DC pool proportions per task (Fig. 3)")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    return _save(fig, path)


def plot_device_accuracy(accuracy: dict[str, np.ndarray], path: Path) -> Path:
    """accuracy: {task: (3,) test accuracy of the mobile, edge and cloud exit alone}. Grouped bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 * len(accuracy) + 3, 4))
    x = np.arange(len(accuracy))
    for k in range(3):
        ax.bar(x + (k - 1) * 0.27, [100 * a[k] for a in accuracy.values()], 0.27, color=COLORS[k],
               label=f"{TIERS[k]}-only")
    ax.set_xticks(x, list(accuracy))
    ax.set_xlabel("task")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy of each device alone (Fig. 4a)")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_pools_tsne(embeddings: np.ndarray, pools: np.ndarray, path: Path, title: str,
                    max_points: int = 1500, seed: int = 0) -> Path:
    """t-SNE of (at most max_points) validation embeddings (N, H), coloured by pool (N,)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(embeddings))[:max_points])
    x = np.asarray(embeddings[keep], dtype=np.float64)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))  # TSNE needs perplexity < n
    with threadpool_limits(1, user_api="openmp"):  # OpenMP threads spin badly on a busy machine (20x slower)
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)  # (n, 2)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    for k in range(3):
        sel = pools[keep] == k
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.6, color=COLORS[k], label=f"{POOLS[k]} ({sel.sum()})")
    ax.set_xlabel("t-SNE dimension 1 (a.u.)")
    ax.set_ylabel("t-SNE dimension 2 (a.u.)")
    ax.set_title(title)
    ax.legend(loc="best", markerscale=3)
    return _save(fig, path)


def plot_pareto(points: dict[str, dict], sweeps: dict[str, list[dict]], path: Path, title: str,
                highlight: str | None = None) -> Path:
    """points: {method: result dict (Table I mean)}; sweeps: {method: [result dict per threshold]}.
    Accuracy against cost as a % of cloud-only cost; threshold sweeps drawn as lines; the `highlight`
    method's operating point (auto's) drawn large."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    cmap = plt.get_cmap("tab10")
    for i, (name, rows) in enumerate(sweeps.items()):
        rows = sorted(rows, key=lambda r: r["cost_change_pct"])
        ax.plot([100 + r["cost_change_pct"] for r in rows], [100 * r["accuracy"] for r in rows], "-",
                color=cmap(i), alpha=0.6, marker=".", label=f"{DISPLAY.get(name, name)} (threshold sweep)")
    markers = "o^sDvP*XhH<>"
    for i, (name, r) in enumerate(points.items()):
        big = name == highlight
        ax.scatter(100 + r["cost_change_pct"], 100 * r["accuracy"], marker="*" if big else markers[i % len(markers)],
                   s=260 if big else 60, edgecolor="black", zorder=4 if big else 3,
                   label=DISPLAY.get(name, name) + (" - operating point" if big else ""))
    ax.set_xlabel("mean cost per sample (% of cloud-only cost)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=8)
    return _save(fig, path)


def plot_ablation(rows: list[dict], path: Path, title: str) -> Path:
    """rows from `dimec.experiments.ablations`: one panel per cost factor; cost change and accuracy
    against the factor's multiplier, one line per method."""
    plt = _plt()
    factors = list(dict.fromkeys(r["factor"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(2, len(factors), figsize=(3.4 * len(factors), 6), squeeze=False)
    for j, factor in enumerate(factors):
        for method in methods:
            sel = sorted((r for r in rows if r["factor"] == factor and r["method"] == method),
                         key=lambda r: r["multiplier"])
            x = [r["multiplier"] for r in sel]
            label = DISPLAY.get(method, method)
            axes[0, j].plot(x, [r["cost_change_pct"] for r in sel], marker="o", label=label)
            axes[1, j].plot(x, [100 * r["accuracy"] for r in sel], marker="o", label=label)
        axes[0, j].set_title(f"varying {factor}")
        axes[0, j].set_ylabel("cost vs cloud-only (%)")
        axes[1, j].set_ylabel("test accuracy (%)")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"{factor} multiplier (x default)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_reliability(outputs, path: Path, title: str, bins: int = 15) -> Path:
    """Reliability diagram per exit (ExitOutputs with fitted temperatures): accuracy against mean confidence
    in 15 equal-width bins, at T = 1 and at the fitted temperature, with each curve's ECE in the legend."""
    from dimec.metrics import expected_calibration_error, reliability_bins

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3), sharey=True)
    raw = outputs.with_temperatures([1.0, 1.0, 1.0])
    for k, ax in enumerate(axes):
        ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
        for name, out, style in (("T = 1", raw, "o--"),
                                 (f"T = {outputs.temperatures[k]:.2f}", outputs, "s-")):
            b = reliability_bins(out.probs[:, k], out.labels, bins)
            used = b["count"] > 0
            ece = expected_calibration_error(out.probs[:, k], out.labels, bins)
            ax.plot(b["confidence"][used], b["accuracy"][used], style, ms=4, label=f"{name} (ECE {ece:.3f})")
        ax.set_title(f"{TIERS[k]} exit")
        ax.set_xlabel("confidence (mean max probability in the bin)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("accuracy in the bin")
    fig.suptitle(title)
    return _save(fig, path)
