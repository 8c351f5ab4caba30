"""The DP model card of an evaluation (`GET /v1/evaluate/{id}/card`), in the spirit of Mitchell et al.'s Model
Cards: the models, the dataset version, the slices, every metric with its interval, a plot of a metric by slice
with error bars, the privacy cost and what it means, and caveats.

Everything here is post-processing of one released evaluation answer (`gateway.evaluation`): no private data is
read. `card` builds the card's content as plain data (numbers and texts, the plot's geometry included), which the
HTTP layer renders as HTML through an autoescaping template (the plot as inline SVG, nothing loaded from elsewhere)
and `markdown` renders as Markdown.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any

SCOPE = (
    "This guarantee covers the evaluation release given the predictions: its sensitivity assumes that the "
    "predictions of other rows do not depend on any one unit. Predictions of a model fitted on these rows carry "
    "whatever the fit leaked about them, which this card does not account for: fitting the model was a separate "
    "access to the private rows that must itself be differentially private and accounted for (train on a "
    "synthetic proxy, or with DP training)."
)
SMALL = 10.0  # a slice value whose released total is below this many count half-widths is flagged small
COLOURS = ["#1f5fbf", "#c2571a", "#1a7f37", "#8e3fb5", "#9a6700", "#b42318", "#0b7285", "#5b6475"]
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 640, 260, 48, 16, 16, 56


@dataclass
class Point:
    x: float
    y: float | None  # None: no estimate (an empty slice)
    top: float  # the interval's high end, in SVG coordinates (y grows downwards)
    bottom: float  # its low end
    colour: str


@dataclass
class Plot:
    """One slice dimension's plot of a metric by slice value, per model, in SVG coordinates."""

    slice: str
    metric: str
    width: int = WIDTH
    height: int = HEIGHT
    points: list[Point] = field(default_factory=list)
    ticks: list[tuple[float, str]] = field(default_factory=list)  # x, slice value
    gridlines: list[tuple[float, str]] = field(default_factory=list)  # y, label
    legend: list[tuple[str, str]] = field(default_factory=list)  # model, colour
    plot_left: int = LEFT
    plot_right: int = WIDTH - RIGHT
    plot_bottom: int = HEIGHT - BOTTOM


def _y(value: float) -> float:
    return TOP + (1.0 - value) * (HEIGHT - TOP - BOTTOM)


def headline(metrics: list[str]) -> tuple[str, str | None]:
    """The metric the card plots: the first requested, macro-averaged unless it is accuracy."""
    first = metrics[0] if metrics else "accuracy"
    return first, None if first == "accuracy" else "macro"


def _plots(answer: dict[str, Any]) -> list[Plot]:
    metric, cls = headline(answer.get("metrics_requested") or [])
    models = [m["model"] for m in answer["models"]]
    colours = {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(models)}
    rows = {
        (r["model"], r["slice"], str(r["value"])): r
        for r in answer["metrics"]
        if r["metric"] == metric and r["class"] == cls
    }
    plots = []
    for s in answer["slices"]:
        plot = Plot(slice=s["slice"], metric=metric if cls is None else f"{metric} ({cls})")
        values = [str(v) for v in s["values"]]
        step = (plot.plot_right - plot.plot_left) / max(len(values), 1)
        for i, value in enumerate(values):
            centre = plot.plot_left + step * (i + 0.5)
            plot.ticks.append((centre, value))
            for j, model in enumerate(models):
                r = rows.get((model, s["slice"], value))
                if r is None:
                    continue
                x = centre + (j - (len(models) - 1) / 2) * min(12.0, step / (len(models) + 1))
                y = None if r["estimate"] is None else _y(float(r["estimate"]))
                plot.points.append(Point(x, y, _y(float(r["high"])), _y(float(r["low"])), colours[model]))
        plot.gridlines = [(_y(v), f"{v:.2f}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)]
        plot.legend = [(m, colours[m]) for m in models]
        plots.append(plot)
    return plots


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def card(answer: dict[str, Any]) -> dict[str, Any]:
    """The card's content from a released evaluation answer."""
    h = float(answer["count_half_width"])
    small = []
    for matrix in answer["confusion"]:
        total = sum(x for row in matrix["counts"] for x in row)
        if total < SMALL * h:
            small.append(f"{matrix['model']}, {matrix['slice']} = {matrix['value']}: released total {total:,}")
    noisy = [
        f"{r['model']}, {r['slice']} = {r['value']}: {r['metric']}{'' if r['class'] is None else ' ' + r['class']} "
        f"in [{r['low']:.3f}, {r['high']:.3f}]"
        for r in answer["metrics"]
        if r["noise_dominated"]
    ]
    epsilon = float(answer["epsilon"])
    return {
        "id": answer.get("evaluation_id"),
        "dataset": answer["dataset"],
        "dataset_version": answer["dataset_version"],
        "models": answer["models"],
        "slices": answer["slices"],
        "classes": answer["classes"],
        "confidence": f"{1 - float(answer['alpha']):.0%}",
        "metrics": [
            {
                **r,
                "shown": f"{_fmt(r['estimate'])} [{r['low']:.3f}, {r['high']:.3f}]",
                "label": r["metric"] + ("" if r["class"] is None else f" ({r['class']})"),
            }
            for r in answer["metrics"]
        ],
        "plots": _plots(answer),
        "privacy": {
            "epsilon": epsilon,
            "sensitivity": answer["sensitivity"],
            "scale": answer["scale"],
            "count_half_width": h,
            "meaning": (
                f"One ε = {epsilon:g} differentially private release (discrete Laplace, sensitivity "
                f"{answer['sensitivity']}): adding or removing any one privacy unit, with all its rows and their "
                f"predictions, changes the probability of any output of this card by at most a factor "
                f"e^ε = {math.exp(epsilon):.3g}. Everything shown is computed from that one release."
            ),
            "scope": SCOPE,
        },
        "caveats": [
            f"Each count is within ±{h:,.1f} of the truth with probability {1 - float(answer['alpha']):.0%}; a "
            "metric's interval holds, together with the other metrics of its matrix, with at least that "
            "probability (conservative interval arithmetic over the counts), not jointly across slices and models.",
            "Counts are over the pre-bounded table (at most max_rows_per_unit rows per privacy unit) and the rows "
            "that have both a gold label among the classes and a prediction.",
            *(
                [f"Small slices (released total below {SMALL:g} count half-widths): " + "; ".join(small)]
                if small
                else []
            ),
            *(
                [f"Noise-dominated metrics (interval wider than 0.5): {len(noisy)}: " + "; ".join(noisy[:20])]
                + ([f"… and {len(noisy) - 20} more"] if len(noisy) > 20 else [])
                if noisy
                else []
            ),
        ],
    }


def _cell(text: Any) -> str:
    """Text for Markdown prose or a table cell, shown as it is by a renderer that passes inline HTML: HTML's
    special characters as entities; backslash, backtick, brackets and the pipe escaped; on one line."""
    out = html.escape(" ".join(str(text).splitlines()), quote=False)
    for ch in "\\`[]|":
        out = out.replace(ch, "\\" + ch)
    return out


def _code(text: Any) -> str:
    """Text as a Markdown code span (where HTML is not interpreted), delimited by more backticks than any run
    inside it so that nothing in it ends the span; on one line."""
    one = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall("`+", one)), default=0) + 1)
    return f"{fence} {one} {fence}"


def markdown(answer: dict[str, Any]) -> str:
    """The card as Markdown (the plot as a table of the plotted metric's intervals)."""
    c = card(answer)
    models = ", ".join(f"`{m['model']}` (attached {m['attached_at']})" for m in c["models"])
    slices = "; ".join(f"{_code(s['slice'])} ({len(s['values'])} values)" for s in c["slices"])
    lines = [
        f"# Model card: {', '.join(m['model'] for m in c['models'])} on {c['dataset']}",
        "",
        f"- **Models:** {models}",
        f"- **Dataset:** `{c['dataset']}` version `{c['dataset_version']}`; classes: {', '.join(c['classes'])}",
        f"- **Slices:** {slices}",
        f"- **Evaluation:** `{c['id']}`",
        "",
        f"## Metrics ({c['confidence']} intervals)",
        "",
        "| model | slice | value | metric | estimate [low, high] | flag |",
        "|---|---|---|---|---|---|",
    ]
    for r in c["metrics"]:
        flag = "noise-dominated" if r["noise_dominated"] else ""
        lines.append(
            f"| {_cell(r['model'])} | {_cell(r['slice'])} | {_cell(r['value'])} | {_cell(r['label'])} | "
            f"{r['shown']} | {flag} |"
        )
    lines += ["", "## Privacy cost", "", c["privacy"]["meaning"], "", c["privacy"]["scope"], ""]
    lines += [
        f"- ε = {c['privacy']['epsilon']:g}, δ = 0; sensitivity {c['privacy']['sensitivity']}, noise scale "
        f"{c['privacy']['scale']:.4g}; each count ±{c['privacy']['count_half_width']:,.1f}",
        "",
        "## Caveats",
        "",
        *[f"- {_cell(x)}" for x in c["caveats"]],
        "",
    ]
    return "\n".join(lines)
