"""The public domain of vote patterns: every combination of {abstain} ∪ polarity per LF, times the gold label.

Each LF's polarity (the labels it may emit) is declared, so the set of vote patterns a row can have is public. The
label model's measurement is a histogram over (pattern × gold) cells of this domain, gold being one of the
classes or missing; a row falls in exactly one cell. Cells are numbered in mixed radix: LF j contributes digit
0 (abstain) or 1 + the position of its vote in its polarity, with LF 0 the least significant digit, and the gold
digit (0 = missing, 1 + class) is the least significant of all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ABSTAIN = -1
MAX_CELLS = 65_536  # public cap on the histogram released for the label model


@dataclass(frozen=True)
class PatternDomain:
    polarity: tuple[tuple[int, ...], ...]  # per LF, the class indices it may emit
    n_classes: int
    has_gold: bool

    @property
    def bases(self) -> tuple[int, ...]:
        return tuple(1 + len(p) for p in self.polarity)

    @property
    def patterns(self) -> int:
        return math.prod(self.bases)

    @property
    def gold_values(self) -> int:
        return self.n_classes + 1 if self.has_gold else 1

    @property
    def cells(self) -> int:
        return self.patterns * self.gold_values

    def pattern_index(self, votes: np.ndarray) -> np.ndarray:
        """The pattern number of each row of an n × m vote matrix (a vote outside the polarity counts as abstain)."""
        votes = np.asarray(votes, dtype=np.int64).reshape(-1, len(self.polarity))
        index = np.zeros(len(votes), dtype=np.int64)
        radix = 1
        for j, (pol, base) in enumerate(zip(self.polarity, self.bases, strict=True)):
            lut = np.zeros(self.n_classes + 1, dtype=np.int64)  # lut[v + 1] = digit of vote v
            for pos, c in enumerate(pol):
                lut[c + 1] = pos + 1
            column = votes[:, j]
            valid = (column >= ABSTAIN) & (column < self.n_classes)
            index += np.where(valid, lut[np.clip(column, ABSTAIN, self.n_classes - 1) + 1], 0) * radix
            radix *= base
        return index

    def cell_index(self, votes: np.ndarray, gold: np.ndarray) -> np.ndarray:
        """The histogram cell of each row (its pattern and its gold label, -1 = missing)."""
        pattern = self.pattern_index(votes)
        if not self.has_gold:
            return pattern
        g = np.asarray(gold, dtype=np.int64)
        g = np.where((g >= 0) & (g < self.n_classes), g + 1, 0)
        return pattern * self.gold_values + g

    def histogram(self, votes: np.ndarray, gold: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Row counts per cell, from distinct (votes, gold) patterns and their counts."""
        out = np.zeros(self.cells, dtype=np.int64)
        np.add.at(out, self.cell_index(votes, gold), np.asarray(counts, dtype=np.int64))
        return out

    def all_patterns(self) -> np.ndarray:
        """The votes (P × m) of every pattern, in pattern-number order."""
        index = np.arange(self.patterns, dtype=np.int64)
        columns = []
        radix = 1
        for pol, base in zip(self.polarity, self.bases, strict=True):
            digit = (index // radix) % base
            lut = np.array([ABSTAIN, *pol], dtype=np.int64)
            columns.append(lut[digit])
            radix *= base
        return np.column_stack(columns) if columns else np.zeros((self.patterns, 0), dtype=np.int64)
