"""The report's PNGs (matplotlib, from the optional extra roomcast[sim])."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MB = 1e6  # decimal, as the design counted (400 x 100 x 100 B = 4 MB)
COLORS = {"message": "C0", "list": "C1"}


def draw(results: dict[str, Any], folder: Path) -> dict[str, Path]:
    """memory.png, hit_ratio.png and sweeper.png in `folder`; returns them by name."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plots need matplotlib: pip install 'roomcast[sim]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    w = results["workload"]
    retention_days = results["settings"]["redis_retention_s"] / 86_400
    out = {}

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for run in runs:
        ax.plot([h["hour"] / 24 for h in run["hours"]], [h["used"] / MB for h in run["hours"]],
                color=COLORS.get(run["policy"]), label=f"{run['policy']} policy: used_memory")
    days = [d / 24 for d in range(0, w["days"] * 24 + 1)]
    design = w["users"] * w["msgs_per_user_day"] * w["body_max"] / MB
    ax.plot(days, [design * min(d, retention_days) for d in days], "--", color="grey",
            label=f"design: {design:.1f} MB/day, kept {retention_days:g} days")
    ax.set(xlabel="simulated day", ylabel="Redis used_memory (MB)", title="Redis memory over the run")
    ax.legend()
    ax.grid(alpha=0.3)
    out["memory"] = _save(fig, folder / "memory.png")

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for run in runs:
        xs = [d["day"] for d in run["days"]]
        color = COLORS.get(run["policy"])
        ax.plot(xs, [100 * _hit(d["reads"]) for d in run["days"]], "o-", color=color,
                label=f"{run['policy']}: all reads")
        ax.plot(xs, [100 * _hit(d["reads_by_depth"].get("newest", {})) for d in run["days"]], "x--", color=color,
                label=f"{run['policy']}: newest page")
    ax.set(xlabel="simulated day", ylabel="% of reads without a MySQL query", ylim=(0, 100),
           title="History reads served by Redis alone")
    ax.legend()
    ax.grid(alpha=0.3)
    out["hit_ratio"] = _save(fig, folder / "hit_ratio.png")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for run in runs:
        color = COLORS.get(run["policy"])
        top.plot([h["hour"] / 24 for h in run["hours"]], [h["sweep_moved"] for h in run["hours"]], color=color,
                 label=f"{run['policy']} policy")
        bottom.plot([d["day"] for d in run["days"]], [d["sweep"]["statements"] for d in run["days"]], "o-",
                    color=color, label=f"{run['policy']}: sweeper inserts")
        bottom.plot([d["day"] for d in run["days"]], [d["flush"]["statements"] for d in run["days"]], "x--",
                    color=color, label=f"{run['policy']}: flush inserts")
    top.set(ylabel="messages moved per hour", title="Sweeper work (retention) and MySQL inserts")
    bottom.set(xlabel="simulated day", ylabel="MySQL insert statements per day")
    for ax in (top, bottom):
        ax.legend()
        ax.grid(alpha=0.3)
    out["sweeper"] = _save(fig, folder / "sweeper.png")
    return out


def _hit(reads: dict[str, int]) -> float:
    total = sum(reads.values())
    return reads.get("redis", 0) / total if total else 0.0


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
