"""pandas views of a gateway's answers: the result frame, `Interval` columns, and the `df.bastion` accessor.

Imported by the client's frame-building methods (never by the `bastion` command's query path). Importing it
registers the accessor: `df.bastion.intervals()` and `df.bastion.plot()` (values with their confidence intervals
as error bars; needs matplotlib, the `plot` extra).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

LOW, HIGH = "_low", "_high"


def _integral(values: list[Any]) -> bool:
    """Every present value is a whole number (an int, or a float without fraction) and at least one is present."""
    present = [v for v in values if v is not None]
    return bool(present) and all(
        (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()) for v in present
    )


def result_frame(raw: dict[str, Any]) -> pd.DataFrame:
    """One row per released group; for each noisy column `c` also `c_low` and `c_high`. A column whose values are
    all whole numbers (counts, integer keys) has pandas' nullable `Int64` dtype, so counts print as integers."""
    columns = [str(c) for c in raw["columns"]]
    rows = raw.get("rows") or []
    intervals = raw.get("intervals") or [[None] * len(columns) for _ in rows]
    out: dict[str, Any] = {}
    for i, c in enumerate(columns):
        values = [r[i] for r in rows]
        out[c] = pd.array(values, dtype="Int64") if _integral(values) else values
        cells = [iv[i] if iv else None for iv in intervals]
        if any(cell is not None for cell in cells):
            out[f"{c}{LOW}"] = pd.array([cell[0] if cell else None for cell in cells], dtype="Float64")
            out[f"{c}{HIGH}"] = pd.array([cell[1] if cell else None for cell in cells], dtype="Float64")
    return pd.DataFrame(out)


def interval_columns(frame: pd.DataFrame) -> list[str]:
    """The columns `c` of `frame` that have both `c_low` and `c_high`."""
    names = [str(c) for c in frame.columns]
    return [c for c in names if f"{c}{LOW}" in names and f"{c}{HIGH}" in names]


def intervals(frame: pd.DataFrame, *, keep_bounds: bool = False) -> pd.DataFrame:
    """`frame` with each `c_low` / `c_high` pair replaced by one column `c_ci` of pandas `Interval`s (closed on
    both sides; missing where the answer has no interval). `keep_bounds=True` keeps the two bound columns."""
    out = frame.copy()
    for c in interval_columns(frame):
        low = pd.to_numeric(frame[f"{c}{LOW}"], errors="coerce").astype("float64")
        high = pd.to_numeric(frame[f"{c}{HIGH}"], errors="coerce").astype("float64")
        at = list(out.columns).index(f"{c}{LOW}")
        if not keep_bounds:
            out = out.drop(columns=[f"{c}{LOW}", f"{c}{HIGH}"])
        out.insert(at, f"{c}_ci", pd.arrays.IntervalArray.from_arrays(low, high, closed="both"))
    return out


@pd.api.extensions.register_dataframe_accessor("bastion")
class BastionAccessor:
    """`df.bastion.intervals()` and `df.bastion.plot()` on frames answered by a Bastion gateway."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self._frame = frame

    def intervals(self, *, keep_bounds: bool = False) -> pd.DataFrame:
        return intervals(self._frame, keep_bounds=keep_bounds)

    def plot(self, y: str | None = None, x: str | list[str] | None = None, ax: Any = None, **kwargs: Any) -> Any:
        """Draw column `y` (default: the first with an interval) per row, labelled by `x` (default: the columns
        without intervals, i.e. the group keys), with the confidence interval as error bars; return the Axes."""
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError(
                "df.bastion.plot() draws with matplotlib, which is not installed: pip install 'bastion[plot]' "
                "(or pip install matplotlib)"
            ) from None
        frame = self._frame
        noisy = interval_columns(frame)
        if y is None:
            if not noisy:
                raise ValueError("this frame has no column with a confidence interval (<col>_low / <col>_high)")
            y = noisy[0]
        if y not in noisy:
            raise ValueError(f"column {y!r} has no confidence interval; columns with one: {', '.join(noisy) or 'none'}")
        bounds = {f"{c}{LOW}" for c in noisy} | {f"{c}{HIGH}" for c in noisy}
        keys = [x] if isinstance(x, str) else list(x) if x is not None else []
        if x is None:
            keys = [str(c) for c in frame.columns if str(c) not in bounds and str(c) not in noisy]
        labels = (
            [" / ".join(str(v) for v in row) for row in frame[keys].itertuples(index=False)]
            if keys
            else [str(i) for i in range(len(frame))]
        )
        value = pd.to_numeric(frame[y], errors="coerce").astype("float64")
        low = pd.to_numeric(frame[f"{y}{LOW}"], errors="coerce").astype("float64")
        high = pd.to_numeric(frame[f"{y}{HIGH}"], errors="coerce").astype("float64")
        # Error bars are distances from the value; an interval that does not contain its value (possible after
        # clamping) draws no bar on that side rather than a negative one.
        below = (value - low).clip(lower=0).fillna(0)
        above = (high - value).clip(lower=0).fillna(0)
        if ax is None:
            _, ax = plt.subplots()
        positions = list(range(len(frame)))
        ax.errorbar(positions, value, yerr=[below, above], fmt=kwargs.pop("fmt", "o"), capsize=4, **kwargs)
        ax.set_xticks(positions, labels, rotation=45 if len(labels) > 6 else 0)
        ax.set_xlabel(" / ".join(keys))
        level = frame.attrs.get("alpha")
        ax.set_ylabel(f"{y} ({1 - level:.0%} CI)" if isinstance(level, float) else y)
        return ax
