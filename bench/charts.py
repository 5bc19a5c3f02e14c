"""PNG charts of a comparison run: a drill timeline per profile, and the ratios at a glance."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from .drill import DrillResult
from .drillstats import timeline

KILL, START = "#c0392b", "#27ae60"
LATENCY_RANGE_MS = (5.0, 5000.0)


def drill_timeline(result: DrillResult, path: Path, *, subtitle: str) -> None:
    """Answered and failed requests per second, and p99 latency, with each kill and restart."""
    seconds = timeline(result)
    t = [s.t for s in seconds]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    top.plot(t, [s.ok for s in seconds], color="#2c7fb8", label="answered 200 (req/s)")
    top.bar(
        t, [s.errors for s in seconds], width=0.9, color=KILL, alpha=0.7, label="errors (req/s)"
    )
    top.set_ylabel("requests per second")
    top.set_ylim(bottom=0, top=max([s.ok + s.errors for s in seconds] + [1]) * 1.25)
    p99 = [s.p99_ms if not math.isnan(s.p99_ms) else None for s in seconds]
    bottom.plot(t, p99, color="#7b3294", marker=".", label="p99 latency (ms)")
    bottom.set_yscale("log")
    # The same range on every profile's chart, so two timelines compare at a glance.
    worst = max([v for v in p99 if v is not None] + [LATENCY_RANGE_MS[1]])
    bottom.set_ylim(LATENCY_RANGE_MS[0], worst * 1.5)
    bottom.set_ylabel("p99 latency, ms (log)")
    bottom.set_xlabel("seconds since the load started")
    for step, timing in zip(result.steps, result.timings, strict=True):
        if step.command is None:
            continue
        color = KILL if step.command == "kill" else START
        for ax in (top, bottom):
            ax.axvline(timing.started, color=color, linestyle="--", linewidth=1)
        top.annotate(
            f"{step.command} {step.service}",
            xy=(timing.started, top.get_ylim()[1]),
            xytext=(3, -12),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=8,
            color=color,
        )
    top.legend(loc="lower left", fontsize=8)
    bottom.legend(loc="upper left", fontsize=8)
    top.set_title(
        f"Failure drill, profile {result.profile}: {result.rate:g} req/s offered (open loop)\n"
        f"{subtitle}",
        fontsize=10,
    )
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio_bars(ratios: Mapping[str, float], path: Path, *, title: str, note: str) -> None:
    """One bar per measure: python's figure over classic's, 1.0 marked."""
    names: Sequence[str] = list(ratios)
    values = [ratios[n] for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 1.8))
    cpu = ["CPU" in n for n in names]
    bars = ax.barh(names, values, color=["#e67e22" if c else "#2c7fb8" for c in cpu])
    ax.legend(
        handles=[
            Patch(color="#2c7fb8", label="throughput: higher is better"),
            Patch(color="#e67e22", label="CPU per request: lower is better"),
        ],
        loc="upper right",
        fontsize=8,
    )
    ax.axvline(1.0, color="black", linewidth=1)
    for bar, value in zip(bars, values, strict=True):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {value:.2f}×",
            va="center",
            fontsize=9,
        )
    ax.invert_yaxis()
    ax.set_xlabel("python profile ÷ classic profile (1.0 = the same)")
    ax.set_xlim(0, max([*values, 1.0]) * 1.2)
    ax.set_title(f"{title}\n{note}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
