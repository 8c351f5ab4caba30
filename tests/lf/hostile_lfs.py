"""Test-only Python LFs that misbehave: the sandbox must contain each of them. Registered by the tests only, for
the duration of a test, through `labeling_functions.registry.REGISTRY.registered`, with the columns `COLUMNS`
declares for them."""

from __future__ import annotations

import socket
import time
from typing import Any

from snorkel.labeling import labeling_function

ABSTAIN = -1
URGENT = 0
SECRET_MARKER = "row contents:"


@labeling_function()
def test_only_sleeps_forever(x: Any) -> int:
    while True:
        time.sleep(3600)


@labeling_function()
def test_only_allocates_without_bound(x: Any) -> int:
    hoard = []
    while True:
        hoard.append(bytearray(64 * 2**20))


@labeling_function()
def test_only_raises_with_row_contents(x: Any) -> int:
    raise ValueError(f"{SECRET_MARKER} {x.triage_note} / {x.diagnosis}")


@labeling_function()
def test_only_opens_a_socket(x: Any) -> int:
    with socket.create_connection(("127.0.0.1", 9), timeout=1):
        return ABSTAIN


@labeling_function()
def test_only_returns_undeclared_label(x: Any) -> int:
    return 1  # declared labels: urgent (0) only, so every vote is counted as an abstention


@labeling_function()
def test_only_raises_on_same_day_visits(x: Any) -> int:
    if x.length_of_stay == 0:
        raise ValueError(f"{SECRET_MARKER} {x.triage_note} / {x.diagnosis}")
    return URGENT if 100 // x.length_of_stay > 10 else ABSTAIN


@labeling_function()
def test_only_sleeps_on_same_day_visits(x: Any) -> int:
    while x.length_of_stay == 0:
        time.sleep(3600)
    return URGENT if x.length_of_stay >= 6 else ABSTAIN


@labeling_function()
def test_only_returns_junk(x: Any) -> Any:
    return {"age": x.age} if x.age % 3 == 0 else (2**70 if x.age % 3 == 1 else "urgent")


@labeling_function()
def test_only_reads_an_undeclared_column(x: Any) -> int:
    # Declared: age. Reads income too (the registry check refuses it; the sandbox fails the run if it got there).
    return URGENT if x.age > 50 and x.income > 1000 else ABSTAIN


@labeling_function()
def test_only_hides_what_it_reads(x: Any) -> int:
    column = "triage" + "_note"
    return URGENT if "pain" in str(getattr(x, column)) else ABSTAIN


@labeling_function()
def test_only_swallows_the_time_limit(x: Any) -> int:
    # A bare except around slow steps catches the per-row alarm too (the registry check refuses it).
    for _ in range(100):
        try:
            time.sleep(0.05 if x.age > 50 else 0)
        except:  # noqa: E722
            continue
    return URGENT


COLUMNS: dict[str, list[str]] = {
    "test_only_sleeps_forever": [],
    "test_only_allocates_without_bound": [],
    "test_only_raises_with_row_contents": ["triage_note", "diagnosis"],
    "test_only_opens_a_socket": [],
    "test_only_returns_undeclared_label": [],
    "test_only_raises_on_same_day_visits": ["length_of_stay", "triage_note", "diagnosis"],
    "test_only_sleeps_on_same_day_visits": ["length_of_stay"],
    "test_only_returns_junk": ["age"],
    "test_only_reads_an_undeclared_column": ["age"],
    "test_only_hides_what_it_reads": ["triage_note"],
    "test_only_swallows_the_time_limit": ["age"],
}
