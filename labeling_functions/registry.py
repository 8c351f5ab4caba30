"""Python labeling functions: Snorkel `@labeling_function` code kept here as reviewed code, registered by name.

LF authors cannot upload code; they name registered LFs in a request. Each entry declares the dataset it was
written for, the classes its integer votes index (Snorkel's encoding: abstain = -1) and the labels it may emit
(its polarity, which is public). Entries run only inside the sandbox worker (`labeling_functions.sandbox`), on
the pre-bounded rows, with a time limit, a memory limit and no network.

The worker finds an LF by (module, attribute), so an LF must be a module-level attribute of an importable module.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from snorkel.labeling import LabelingFunction, labeling_function

from policies.errors import InvalidRequest, NotFound
from policies.schema import Policy

ABSTAIN = -1


class LFNotFound(NotFound):
    code = "lf_not_found"


@dataclass(frozen=True)
class PythonLF:
    name: str
    dataset: str
    classes: tuple[str, ...]  # what the LF's integer votes index
    labels: tuple[str, ...]  # polarity: the labels it may emit
    module: str
    attribute: str
    description: str
    code_sha256: str

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "python",
            "dataset": self.dataset,
            "classes": list(self.classes),
            "labels": list(self.labels),
            "description": self.description,
            "module": self.module,
            "code_sha256": self.code_sha256,
        }

    def check_policy(self, policy: Policy) -> None:
        classes = tuple(policy.labels.classes) if policy.labels else ()
        if self.dataset != policy.dataset:
            raise InvalidRequest(
                f"python labeling function {self.name!r} was written for dataset "
                f"{self.dataset!r}, not {policy.dataset!r}"
            )
        if self.classes != classes:
            raise InvalidRequest(
                f"python labeling function {self.name!r} votes over classes {list(self.classes)}, "
                f"but dataset {policy.dataset!r} has {list(classes)}"
            )

    @property
    def label_indices(self) -> tuple[int, ...]:
        return tuple(self.classes.index(label) for label in self.labels)


class Registry:
    """Python LFs by name."""

    def __init__(self) -> None:
        self._entries: dict[str, PythonLF] = {}

    def register(self, lf: LabelingFunction, *, dataset: str, classes: list[str], labels: list[str]) -> PythonLF:
        fn = lf._f
        if lf.name in self._entries:
            raise ValueError(f"a python labeling function named {lf.name!r} is already registered")
        if not set(labels) <= set(classes) or not labels:
            raise ValueError(f"labels {labels} must be a non-empty subset of classes {classes}")
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            source = fn.__qualname__
        entry = PythonLF(
            name=lf.name,
            dataset=dataset,
            classes=tuple(classes),
            labels=tuple(labels),
            module=fn.__module__,
            attribute=fn.__name__,
            description=inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0],
            code_sha256=hashlib.sha256(source.encode()).hexdigest(),
        )
        self._entries[lf.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    @contextmanager
    def registered(
        self, lf: LabelingFunction, *, dataset: str, classes: list[str], labels: list[str]
    ) -> Iterator[PythonLF]:
        """Register `lf` for the duration of a block (tests and one-off reviews)."""
        entry = self.register(lf, dataset=dataset, classes=classes, labels=labels)
        try:
            yield entry
        finally:
            self.unregister(entry.name)

    def get(self, name: str) -> PythonLF:
        try:
            return self._entries[name]
        except KeyError:
            raise LFNotFound(
                f"no python labeling function named {name!r} (GET /v1/lf/registry lists them)", lf=name
            ) from None

    def entries(self) -> list[PythonLF]:
        return [self._entries[n] for n in sorted(self._entries)]


REGISTRY = Registry()


def reviewed(*, dataset: str, classes: list[str], labels: list[str]) -> Any:
    """Decorator for reviewed LFs in this module: `@reviewed(...)` above `@labeling_function()`."""

    def wrap(lf: LabelingFunction) -> LabelingFunction:
        REGISTRY.register(lf, dataset=dataset, classes=classes, labels=labels)
        return lf

    return wrap


# --- reviewed LFs for the demo `visits` dataset -----------------------------------------------------------

VISITS = "visits"
VISIT_CLASSES = ["urgent", "routine"]
URGENT, ROUTINE = 0, 1
# The public ICD-10 chapters the demo's triage guideline calls urgent (the guideline, not the data).
_URGENT_DX = frozenset({"I21", "I63", "J96", "R07", "S72", "A41", "K35", "N17"})
_ROUTINE_WORDS = re.compile(r"\b(routine|follow-up|refill|vaccination|annual|review)\b")
_RED_FLAGS = re.compile(r"chest pain|shortness of breath|stroke|unresponsive|bleeding")


@reviewed(dataset=VISITS, classes=VISIT_CLASSES, labels=["urgent"])
@labeling_function()
def urgent_diagnosis(x: Any) -> int:
    """Urgent when the diagnosis is on the triage guideline's urgent list."""
    return URGENT if x.diagnosis in _URGENT_DX else ABSTAIN


@reviewed(dataset=VISITS, classes=VISIT_CLASSES, labels=["urgent"])
@labeling_function()
def red_flag_words(x: Any) -> int:
    """Urgent when the triage note names a red-flag symptom."""
    note = x.triage_note
    return URGENT if isinstance(note, str) and _RED_FLAGS.search(note.lower()) else ABSTAIN


@reviewed(dataset=VISITS, classes=VISIT_CLASSES, labels=["routine"])
@labeling_function()
def routine_words(x: Any) -> int:
    """Routine when the triage note describes a planned visit (check-up, follow-up, refill, vaccination)."""
    note = x.triage_note
    return ROUTINE if isinstance(note, str) and _ROUTINE_WORDS.search(note.lower()) else ABSTAIN


@reviewed(dataset=VISITS, classes=VISIT_CLASSES, labels=["urgent", "routine"])
@labeling_function()
def stay_and_age(x: Any) -> int:
    """Urgent for a long stay of an older patient, routine for a same-day visit of a younger one."""
    if x.age is None or x.length_of_stay is None:
        return ABSTAIN
    if x.age >= 70 and x.length_of_stay >= 6:
        return URGENT
    if x.age < 40 and x.length_of_stay == 0:
        return ROUTINE
    return ABSTAIN
