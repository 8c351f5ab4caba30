"""Fidelity report of a proxy, computed from the DP model and the proxy only (no private row is read again).

Per column: the DP marginal (noisy counts normalised by their noisy total) with the noise interval of each bin,
the proxy's distribution over the same bins, and an SDMetrics-style TVComplement score (1 − total variation
distance). Per column pair: the DP-measured latent correlation (`dp_rho`), the one the model used after its
correlation matrix was repaired to positive definite (`model_rho`), and the proxy's, measured the same way
(the polychoric ρ of the proxy's coarse two-way table), with SDMetrics-style CorrelationSimilarity
(1 − |dp_rho − proxy_rho| / 2).
One HTML page per column (inline SVG, no plotting library needed) draws both distributions and the intervals.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from policies.mechanisms import integer_accuracy
from synth.columns import BinKind, ColumnBins
from synth.copula import group_thresholds, polychoric
from synth.model import DPCopulaModel

ALPHA = 0.05


def _distribution(col: ColumnBins, s: pd.Series) -> np.ndarray:
    idx = col.bin_of(s)
    idx = idx[idx >= 0]
    counts = np.bincount(idx, minlength=col.size).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def _proxy_rho(proxy: pd.DataFrame, model: DPCopulaModel, pair: Any) -> float:
    ma, mb = model.marginal(pair.a), model.marginal(pair.b)
    ga, gb = np.asarray(pair.groups_a), np.asarray(pair.groups_b)
    ia, ib = ma.column.bin_of(proxy[pair.a]), mb.column.bin_of(proxy[pair.b])
    ok = (ia >= 0) & (ia < ma.column.n_bins) & (ib >= 0) & (ib < mb.column.n_bins)
    na, nb = int(ga.max()) + 1, int(gb.max()) + 1
    table = np.bincount(ga[ia[ok]] * nb + gb[ib[ok]], minlength=na * nb).reshape(na, nb)
    return polychoric(table, group_thresholds(ma.value_mass, ga), group_thresholds(mb.value_mass, gb))


def dp_fidelity(model: DPCopulaModel, proxy: pd.DataFrame, alpha: float = ALPHA) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    for m in model.marginals:
        col = m.column
        total = m.noisy_total
        half = integer_accuracy(m.scale, alpha) if m.scale > 0 else 0.0
        noisy = np.asarray(m.noisy, dtype=np.float64)
        cleaned = m.cleaned
        dp_p = cleaned / max(cleaned.sum(), 1.0)
        proxy_p = _distribution(col, proxy[col.name])
        low = np.clip(noisy - half, 0, None) / total
        high = np.clip(noisy + half, 0, None) / total
        labels = col.bin_labels() + (["NULL"] if col.has_null_bin else [])
        columns[col.name] = {
            "bins": labels,
            "dp": dp_p.round(6).tolist(),
            "dp_low": low.round(6).tolist(),
            "dp_high": high.round(6).tolist(),
            "proxy": proxy_p.round(6).tolist(),
            "noise_scale": m.scale,
            "count_half_width": half,
            "epsilon": m.epsilon,
            "tv_complement": float(1 - 0.5 * np.abs(dp_p - proxy_p).sum()),
            "proxy_within_interval": float(np.mean((proxy_p >= low - 1e-9) & (proxy_p <= high + 1e-9))),
        }
    pairs = []
    names = [m.column.name for m in model.marginals]
    for p in model.pairs:
        rho_proxy = _proxy_rho(proxy, model, p)
        rho_model = model.correlation[names.index(p.a)][names.index(p.b)]
        pairs.append(
            {
                "columns": [p.a, p.b],
                "dp_rho": round(p.rho, 4),
                "model_rho": round(rho_model, 4),
                "proxy_rho": round(rho_proxy, 4),
                "noise_scale": p.scale,
                "epsilon": p.epsilon,
                "correlation_similarity": float(1 - abs(p.rho - rho_proxy) / 2),
            }
        )
    shape = float(np.mean([c["tv_complement"] for c in columns.values()])) if columns else 1.0
    trend = float(np.mean([p["correlation_similarity"] for p in pairs])) if pairs else 1.0
    return {
        "reference": "DP measurements (no private rows were read for this report)",
        "alpha": alpha,
        "scores": {"column_shapes": shape, "column_pair_trends": trend, "overall": (shape + trend) / 2},
        "columns": columns,
        "pairs": pairs,
    }


def non_dp_fidelity(columns: list[ColumnBins], private: pd.DataFrame, proxy: pd.DataFrame) -> dict[str, Any]:
    """Column shapes of a non-DP proxy: its own distribution, and only a score (TVComplement) against the
    private rows it was fitted on, so the report adds no private histogram to the approved release."""
    out: dict[str, Any] = {}
    for col in columns:
        if col.kind == BinKind.KEYS:  # bins from the proxy's own values: no private key is named
            col = col.with_keys(sorted(set(map(str, proxy[col.name].dropna()))))
        real_p, proxy_p = _distribution(col, private[col.name]), _distribution(col, proxy[col.name])
        out[col.name] = {
            "bins": col.bin_labels() + (["NULL"] if col.has_null_bin else []),
            "proxy": proxy_p.round(6).tolist(),
            "tv_complement": float(1 - 0.5 * np.abs(real_p - proxy_p).sum()),
        }
    shape = float(np.mean([c["tv_complement"] for c in out.values()])) if out else 1.0
    return {
        "reference": "private rows (NOT differentially private; scores only)",
        "scores": {"column_shapes": shape},
        "columns": out,
        "pairs": [],
    }


# --- HTML pages ---------------------------------------------------------------------------------------------


def _svg(name: str, c: dict[str, Any]) -> str:
    prox = c["proxy"]
    ref = c.get("dp")
    low, high = c.get("dp_low"), c.get("dp_high")
    n = len(prox)
    w, h, pad = 900, 320, 40
    top = max([*(ref or []), *prox, *(high or [])] + [1e-9])
    bw = (w - 2 * pad) / max(n, 1)

    def y(v: float) -> float:
        return h - pad - (h - 2 * pad) * v / top

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
        f'aria-label="{html.escape(name)}">',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#444"/>',
    ]
    for i in range(n):
        x = pad + i * bw
        if ref is not None:
            parts.append(
                f'<rect x="{x + bw * 0.1:.1f}" y="{y(ref[i]):.1f}" width="{bw * 0.4:.1f}" '
                f'height="{h - pad - y(ref[i]):.1f}" fill="#4c78a8"><title>DP {ref[i]:.4f}</title></rect>'
            )
        parts.append(
            f'<rect x="{x + bw * 0.5:.1f}" y="{y(prox[i]):.1f}" width="{bw * 0.4:.1f}" '
            f'height="{h - pad - y(prox[i]):.1f}" fill="#f58518"><title>proxy {prox[i]:.4f}</title></rect>'
        )
        if low is not None and high is not None:
            cx = x + bw * 0.3
            parts.append(
                f'<line x1="{cx:.1f}" y1="{y(low[i]):.1f}" x2="{cx:.1f}" y2="{y(high[i]):.1f}" '
                f'stroke="#222" stroke-width="1.5"/>'
            )
    parts.append(f'<text x="{pad}" y="{pad - 12}" font-size="13">max {top:.4f}</text></svg>')
    return "".join(parts)


def render_pages(report: dict[str, Any], directory: Path, title: str) -> list[str]:
    """Write index.html and one page per column; return the page names."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    dp = any("dp" in c for c in report["columns"].values())
    legend = "blue: DP marginal, black: its 95% noise interval; orange: proxy" if dp else "orange: proxy"
    for name, c in report["columns"].items():
        ref = c.get("dp") or [float("nan")] * len(c["proxy"])
        rows = "".join(
            f"<tr><td>{html.escape(str(b))}</td><td>{r:.4f}</td><td>{p:.4f}</td></tr>"
            for b, r, p in zip(c["bins"], ref, c["proxy"], strict=False)
        )
        page = (
            f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}: {html.escape(name)}</title>"
            f"<h1>{html.escape(name)}</h1><p>{legend}. TVComplement against the reference "
            f"({html.escape(report['reference'])}): {c['tv_complement']:.3f}</p>{_svg(name, c)}"
            f"<table border=1 cellpadding=3><tr><th>bin</th><th>DP</th><th>proxy</th></tr>{rows}</table>"
            "<p><a href='index.html'>all columns</a></p>"
        )
        fname = f"column_{name}.html"
        (directory / fname).write_text(page)
        names.append(fname)
    pairs = "".join(
        f"<tr><td>{html.escape(' × '.join(p['columns']))}</td><td>{p['dp_rho']:.3f}</td><td>{p['proxy_rho']:.3f}</td>"
        f"<td>{p['correlation_similarity']:.3f}</td></tr>"
        for p in report.get("pairs", [])
    )
    links = "".join(f"<li><a href='{f}'>{html.escape(f[7:-5])}</a></li>" for f in names)
    scores = "".join(f"<li>{html.escape(k)}: {v:.3f}</li>" for k, v in report["scores"].items())
    (directory / "index.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
        f"<p>Reference: {html.escape(report['reference'])}</p><ul>{scores}</ul><h2>Columns</h2><ul>{links}</ul>"
        f"<h2>Pairwise latent correlations</h2><table border=1 cellpadding=3><tr><th>pair</th><th>DP ρ</th>"
        f"<th>proxy ρ</th><th>similarity</th></tr>{pairs}</table>"
    )
    return ["index.html", *names]
