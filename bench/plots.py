"""PNG plots of the serving benchmarks (matplotlib, Agg backend: no display needed), into docs/figures/."""

from __future__ import annotations

from pathlib import Path

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def concurrency_plot(
    path: Path, title: str, ttfa_ms: dict[int, list[float]], throughput: dict[int, float], throughput_label: str
) -> Path:
    """Left: time to first audio p50/p95 vs concurrency; right: throughput vs concurrency."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    cs = sorted(ttfa_ms)
    a.plot(cs, [_pct(ttfa_ms[c], 0.5) for c in cs], "o-", label="p50")
    a.plot(cs, [_pct(ttfa_ms[c], 0.95) for c in cs], "s--", label="p95")
    a.set(xlabel="concurrent streams", ylabel="time to first audio (ms)", xticks=cs, title="Time to first audio")
    a.set_ylim(bottom=0)
    a.legend()
    a.grid(alpha=0.3)
    cs = sorted(throughput)
    b.plot(cs, [throughput[c] for c in cs], "o-", color="tab:green")
    b.set(xlabel="concurrent streams", ylabel=throughput_label, xticks=cs, title="Throughput")
    b.set_ylim(bottom=0)
    b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def distribution_plot(path: Path, title: str, series: dict[str, list[float]], xlabel: str) -> Path:
    """Empirical CDFs of several latency samples on one axis (medians marked)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in series.items():
        if not values:
            continue
        v = sorted(values)
        ax.step(
            v,
            [(i + 1) / len(v) for i in range(len(v))],
            where="post",
            label=f"{label} (n={len(v)}, p50 {_pct(v, 0.5):.0f})",
        )
    ax.set(xlabel=xlabel, ylabel="fraction of turns", title=title, ylim=(0, 1.02))
    values = [x for v in series.values() for x in v if x > 0]
    if values and max(values) > 10 * min(values):  # e.g. idle vs loaded: a log axis keeps both readable
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
