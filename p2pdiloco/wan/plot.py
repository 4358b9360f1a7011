"""The plot beside `bench wan`'s JSON."""
from __future__ import annotations

from pathlib import Path


def plot(result: dict, path: Path) -> None:
    """Eval loss of the global model against wall clock (every peer's curve), and compute
    utilization (mean, with the lowest peer's as the whisker), per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: m for n, m in result["methods"].items() if "error" not in m}
    if not ok:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (name, m) in enumerate(ok.items()):
        for p, curve in enumerate(m["eval_curves"]):
            ax.plot([c["wall_s"] for c in curve], [c["eval_loss"] for c in curve], marker=".", color=f"C{k}",
                    alpha=0.8, label=name if p == 0 else None)
        u, lo = m["compute_utilization"], m["compute_utilization_min"]
        bx.bar(k, u, color=f"C{k}", yerr=[[u - lo], [0]], capsize=4)
    title = f"{result['peers']} peers, {result['bandwidth']}, {result['delay']}, {result['loss']:g}% loss"
    if result.get("slowdown"):
        title += f", slowdown {result['slowdown']}"
    ax.set(xlabel="wall clock of the peer (s)", ylabel="eval loss (global model)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bx.axhline(0.95, color="gray", linestyle="--", linewidth=1)
    bx.set_xticks(range(len(ok)), list(ok), rotation=20, fontsize=8)
    bx.set(ylabel="compute utilization (mean; whisker: lowest peer)", ylim=(0, 1.05))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
