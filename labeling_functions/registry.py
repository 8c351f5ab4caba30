"""Python labeling functions: Snorkel `@labeling_function` code kept here as reviewed code, registered by name.

LF authors cannot upload code; they name registered LFs in a request. Each entry declares the dataset it was
written for, the classes its integer votes index (Snorkel's encoding: abstain = -1), the labels it may emit
(its polarity, which is public) and the columns it reads. Entries run only inside the sandbox worker
(`labeling_functions.sandbox`), on the pre-bounded rows, with a time limit, a memory limit and no network, and see
only their declared columns: an LF is applied once per distinct combination of them (`labeling_functions.combos`).

The columns an LF reads are checked against its code when it is registered: every use of its row argument must be
`x.column` or `x["column"]` with a declared column. Code that reads an undeclared column, or uses the row in any
other way (passes it on, `getattr(x, name)`, `x[variable]`, preprocessors), cannot be verified and is refused
before anything is charged, with an error that names the LF (`PythonLF.check_policy`).

The worker finds an LF by (module, attribute), so an LF must be a module-level attribute of an importable module.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import textwrap
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
    columns: tuple[str, ...] = ()  # the columns it reads, declared by its reviewer
    problem: str | None = None  # why its code does not match the declaration (None: it does)

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "python",
            "dataset": self.dataset,
            "classes": list(self.classes),
            "labels": list(self.labels),
            "description": self.description,
            "module": self.module,
            "columns": list(self.columns),
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
        if self.problem is not None:
            raise InvalidRequest(
                f"python labeling function {self.name!r} {self.problem}; it is refused (fix its code or the "
                "columns declared for it in the registry)",
                reason="undeclared_column",
                lf=self.name,
            )
        usable = policy.usable_columns(labeling=True)
        unusable = [c for c in self.columns if c not in usable]
        if unusable:
            raise InvalidRequest(
                f"python labeling function {self.name!r} reads column(s) {unusable} that labeling functions may not "
                f"use on dataset {policy.dataset!r} (usable: {', '.join(sorted(usable))})",
                reason="unusable_column",
                lf=self.name,
            )

    @property
    def label_indices(self) -> tuple[int, ...]:
        return tuple(self.classes.index(label) for label in self.labels)


def read_columns(fn: Any) -> tuple[frozenset[str] | None, str | None]:
    """The columns `fn`'s code reads from its row argument, from its syntax tree: (columns, None), or (None, why
    they cannot be told) when the row is used in any way but `x.column` or `x["column"]` (the check fails closed)."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None, "has no readable source code"
    node = next(
        (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == fn.__name__),
        None,
    )
    if node is None or not node.args.args:
        return None, "takes no row argument"
    for handler in ast.walk(node):
        if isinstance(handler, ast.ExceptHandler) and _catches_everything(handler.type):
            return None, (
                f"catches every exception (line {handler.lineno} of its source: a bare except or BaseException), "
                "which would swallow the per-row time limit"
            )
    row = node.args.args[0].arg
    parents = {child: parent for parent in ast.walk(node) for child in ast.iter_child_nodes(parent)}
    columns: set[str] = set()
    for name in ast.walk(node):
        if not isinstance(name, ast.Name) or name.id != row:
            continue
        parent = parents.get(name)
        if isinstance(name.ctx, ast.Load) and isinstance(parent, ast.Attribute) and parent.value is name:
            columns.add(parent.attr)
        elif (
            isinstance(name.ctx, ast.Load)
            and isinstance(parent, ast.Subscript)
            and parent.value is name
            and isinstance(parent.slice, ast.Constant)
            and isinstance(parent.slice.value, str)
        ):
            columns.add(parent.slice.value)
        else:
            return None, (
                f"uses its row argument {row!r} other than as {row}.column or {row}['column'] "
                f"(line {name.lineno} of its source), so the columns it reads cannot be checked"
            )
    return frozenset(columns), None


def _catches_everything(kind: ast.expr | None) -> bool:
    """Whether an except clause of this type catches BaseException (the sandbox's per-row time limit is one)."""
    if kind is None:
        return True
    names = kind.elts if isinstance(kind, ast.Tuple) else [kind]
    return any(isinstance(n, ast.Name | ast.Attribute) and ast.unparse(n).endswith("BaseException") for n in names)


class Registry:
    """Python LFs by name."""

    def __init__(self) -> None:
        self._entries: dict[str, PythonLF] = {}

    def register(
        self, lf: LabelingFunction, *, dataset: str, classes: list[str], labels: list[str], columns: list[str]
    ) -> PythonLF:
        """Register a reviewed LF. `columns` are the columns it reads; its code is checked against them here, and
        an LF whose code does not match is registered with the problem, which every request naming it gets."""
        fn = lf._f
        if lf.name in self._entries:
            raise ValueError(f"a python labeling function named {lf.name!r} is already registered")
        if not set(labels) <= set(classes) or not labels:
            raise ValueError(f"labels {labels} must be a non-empty subset of classes {classes}")
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            source = fn.__qualname__
        reads, problem = read_columns(fn)
        if getattr(lf, "_pre", None):
            problem = "has preprocessors, whose column reads cannot be checked"
        elif reads is not None and not reads <= set(columns):
            problem = f"reads column(s) {sorted(reads - set(columns))} that its registry entry does not declare"
        entry = PythonLF(
            name=lf.name,
            dataset=dataset,
            classes=tuple(classes),
            labels=tuple(labels),
            module=fn.__module__,
            attribute=fn.__name__,
            description=inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0],
            code_sha256=hashlib.sha256(source.encode()).hexdigest(),
            columns=tuple(dict.fromkeys(columns)),
            problem=problem,
        )
        self._entries[lf.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    @contextmanager
    def registered(
        self, lf: LabelingFunction, *, dataset: str, classes: list[str], labels: list[str], columns: list[str]
    ) -> Iterator[PythonLF]:
        """Register `lf` for the duration of a block (tests and one-off reviews)."""
        entry = self.register(lf, dataset=dataset, classes=classes, labels=labels, columns=columns)
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


def reviewed(*, dataset: str, classes: list[str], labels: list[str], columns: list[str]) -> Any:
    """Decorator for reviewed LFs in this module: `@reviewed(...)` above `@labeling_function()`."""

    def wrap(lf: LabelingFunction) -> LabelingFunction:
        REGISTRY.register(lf, dataset=dataset, classes=classes, labels=labels, columns=columns)
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


@reviewed(dataset=VISITS, classes=VISIT_CLASSES, labels=["urgent"], columns=["diagnosis"])
@labeling_function()
def urgent_diagnosis(x: Any) -> int:
    """Urgent when the diagnosis is on the triage guideline's urgent list."""
    return URGENT if x.diagnosis in _URGENT_DX else ABSTAIN


@reviewed(dataset=VISITS, classes=VISIT_CLASSES, labels=["urgent"], columns=["triage_note"])
@labeling_function()
def red_flag_words(x: Any) -> int:
    """Urgent when the triage note names a red-flag symptom."""
    note = x.triage_note
    return URGENT if isinstance(note, str) and _RED_FLAGS.search(note.lower()) else ABSTAIN


@reviewed(dataset=VISITS, classes=VISIT_CLASSES, labels=["routine"], columns=["triage_note"])
@labeling_function()
def routine_words(x: Any) -> int:
    """Routine when the triage note describes a planned visit (check-up, follow-up, refill, vaccination)."""
    note = x.triage_note
    return ROUTINE if isinstance(note, str) and _ROUTINE_WORDS.search(note.lower()) else ABSTAIN


@reviewed(dataset=VISITS, classes=VISIT_CLASSES, labels=["urgent", "routine"], columns=["age", "length_of_stay"])
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
