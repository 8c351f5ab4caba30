"""Snorkel's LabelModel fitted on a DP histogram of vote patterns, never on the private rows.

The label model sees only the released (noisy) count of each vote pattern of the public domain
(`labeling_functions.patterns`): negative counts are clipped to 0, a large total is scaled down proportionally,
and the label matrix is rebuilt by repeating each pattern its count's number of times. Fitting and predicting are
post-processing of that release. A row's label is the model's label for the row's own vote pattern, so it
depends on that row's votes alone. The per-row labels go to a private Parquet file for downstream jobs (row id of
the pre-bounded table, the predicted class index or -1, one probability column per class); it is never served.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ABSTAIN = -1
SEED = 12345
EPOCHS = 200
MAX_FIT_ROWS = 200_000  # the rebuilt label matrix is scaled down to at most this many rows (public)


@dataclass(frozen=True)
class PatternLabels:
    """The label model's answer for every pattern of the domain (post-processing of a DP release)."""

    predicted: np.ndarray  # (P,) class index, or -1 (ties, patterns no LF voted on)
    probabilities: np.ndarray  # (P, classes)


def rebuilt_counts(noisy_counts: np.ndarray, max_rows: int = MAX_FIT_ROWS) -> np.ndarray:
    """Non-negative integer pattern counts from noisy ones: clipped at 0, scaled to at most `max_rows` in all."""
    counts = np.clip(np.asarray(noisy_counts, dtype=np.float64), 0.0, None)
    total = float(counts.sum())
    if total > max_rows:
        counts = counts * (max_rows / total)
    return np.rint(counts).astype(np.int64)


def _majority(patterns: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    from snorkel.labeling.model import MajorityLabelVoter

    voter = MajorityLabelVoter(cardinality=n_classes, verbose=False)
    return voter.predict(patterns, tie_break_policy="abstain"), voter.predict_proba(patterns)


def fit_on_counts(patterns: np.ndarray, noisy_counts: np.ndarray, n_classes: int) -> PatternLabels:
    """Fit the LabelModel on the label matrix rebuilt from noisy pattern counts; label every pattern.

    If the rebuilt matrix has no vote, or the fit fails or gives non-finite probabilities (the input is noise, so
    any of this can happen), every pattern gets its majority vote instead.
    """
    counts = rebuilt_counts(noisy_counts)
    fired = (patterns != ABSTAIN).any(axis=1)
    preds = probs = None
    if int(counts[fired].sum()) > 0:
        try:
            import torch
            from snorkel.labeling.model import LabelModel

            torch.manual_seed(SEED)
            matrix = np.repeat(patterns, counts, axis=0)
            model = LabelModel(cardinality=n_classes, verbose=False, device="cpu")
            model.fit(L_train=matrix, n_epochs=EPOCHS, seed=SEED, progress_bar=False, log_freq=EPOCHS + 1)
            probs = model.predict_proba(patterns)
            preds = model.predict(patterns, tie_break_policy="abstain")
            if not np.isfinite(probs).all():
                preds = probs = None
        except Exception:  # noqa: BLE001 - post-processing of noise: fall back to the majority vote
            preds = probs = None
    if preds is None or probs is None:
        preds, probs = _majority(patterns, n_classes)
    # A pattern no LF voted on gets the prior, not a label.
    preds = np.where(fired, preds, ABSTAIN).astype(np.int64)
    return PatternLabels(predicted=preds, probabilities=np.asarray(probs, dtype=np.float64))


def write_labels(
    output: Path, row_ids: np.ndarray, pattern_of_row: np.ndarray, labels: PatternLabels, classes: list[str]
) -> Path:
    """Write each row's label (its pattern's) and class probabilities to `output`, mode 0600, atomically."""
    preds = labels.predicted[pattern_of_row] if len(pattern_of_row) else np.zeros(0, dtype=np.int64)
    probs = labels.probabilities[pattern_of_row] if len(pattern_of_row) else np.zeros((0, len(classes)))
    output.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    table = pa.table(
        {
            "row": pa.array(np.asarray(row_ids, dtype=np.int64), pa.int64()),
            "label": pa.array(np.asarray(preds, dtype=np.int64), pa.int64()),
            **{f"prob_{c}": pa.array(probs[:, i], pa.float64()) for i, c in enumerate(classes)},
        }
    )
    tmp = output.with_name(output.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    pq.write_table(table, tmp)
    os.replace(tmp, output)
    return output
