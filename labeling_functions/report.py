"""Released LF statistics as DataFrames shaped like Snorkel's `LFAnalysis.lf_summary()`, plus interval columns."""

from __future__ import annotations

from typing import Any

import pandas as pd

COLUMNS = [
    ("Coverage", "coverage"),
    ("Overlaps", "overlaps"),
    ("Conflicts", "conflicts"),
    ("Correct", "correct"),
    ("Incorrect", "incorrect"),
    ("Emp. Acc.", "emp_acc"),
]


def summary_frame(raw: dict[str, Any]) -> pd.DataFrame:
    """One row per LF (index: name): Polarity, Coverage, Overlaps, Conflicts, Correct, Incorrect, Emp. Acc.
    (the last three when the dataset has a gold column), and `<column>_low` / `<column>_high` for each."""
    records: list[tuple[Any, dict[str, Any]]] = []
    for lf in raw.get("lfs", []):
        row: dict[str, Any] = {"j": len(records), "Polarity": lf["polarity"]}
        for title, key in COLUMNS:
            if key in lf:
                cell = lf[key]
                row[title] = cell["value"]
                row[f"{title}_low"], row[f"{title}_high"] = cell["interval"]
        records.append((lf["name"], row))
    frame = pd.DataFrame([r for _, r in records], index=[n for n, _ in records])
    ordered = ["j", "Polarity"] + [c for title, _ in COLUMNS for c in (title, f"{title}_low", f"{title}_high")]
    frame = frame[[c for c in ordered if c in frame.columns]]
    frame.attrs.update({k: v for k, v in raw.items() if k not in {"lfs"}})
    return frame


def pairwise_frames(raw: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The LF × LF overlap and conflict rates (fractions of rows), if released."""
    pw = raw.get("pairwise")
    if not pw:
        return {}
    names = pw["lfs"]
    return {kind: pd.DataFrame(pw[kind], index=names, columns=names) for kind in ("overlaps", "conflicts")}
