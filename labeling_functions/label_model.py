"""Snorkel's LabelModel fitted on the private label matrix inside Bastion.

The probabilistic labels go to a private Parquet file for downstream jobs (row id of the pre-bounded table, the
predicted class index or -1, one probability column per class); people get only the DP summaries released by
`labeling_functions.statistics` (class balance of the produced labels, agreement with the gold labels).
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


@dataclass(frozen=True)
class LabelModelRun:
    predicted: np.ndarray  # counts per class, then abstain (ties and rows no LF voted on)
    agree: int
    disagree: int
    output: Path


def fit_and_write(row_ids: np.ndarray, matrix: np.ndarray, gold: np.ndarray, classes: list[str],
                  output: Path) -> LabelModelRun:
    """Fit the label model, write its labels to `output` (mode 0600) and return the exact summary counts."""
    import torch
    from snorkel.labeling.model import LabelModel

    torch.manual_seed(SEED)
    model = LabelModel(cardinality=len(classes), verbose=False, device="cpu")
    model.fit(L_train=matrix, n_epochs=EPOCHS, seed=SEED, progress_bar=False, log_freq=EPOCHS + 1)
    probs = model.predict_proba(matrix)
    preds = model.predict(matrix, tie_break_policy="abstain")
    # A row no LF voted on gets the prior, not a label.
    preds = np.where((matrix != ABSTAIN).any(axis=1), preds, ABSTAIN).astype(np.int64)

    output.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    table = pa.table({"row": pa.array(row_ids, pa.int64()), "label": pa.array(preds, pa.int64()),
                      **{f"prob_{c}": pa.array(probs[:, i], pa.float64()) for i, c in enumerate(classes)}})
    tmp = output.with_name(output.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    pq.write_table(table, tmp)
    os.replace(tmp, output)

    predicted = np.array([int((preds == c).sum()) for c in range(len(classes))] + [int((preds == ABSTAIN).sum())],
                         dtype=np.int64)
    compared = (preds != ABSTAIN) & (gold != ABSTAIN)
    agree = int((compared & (preds == gold)).sum())
    return LabelModelRun(predicted=predicted, agree=agree, disagree=int(compared.sum()) - agree, output=output)
