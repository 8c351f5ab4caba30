"""Exceptions raised by the audit package (it depends on no other Bastion package, so it has its own tree)."""

from __future__ import annotations


class AuditError(Exception):
    """Base class of every audit error."""


class AuditWriteError(AuditError):
    """The log could not be written durably; the caller must fail closed (refuse to answer)."""


class AuditRecordError(AuditWriteError, ValueError):
    """The event cannot become a record (not a dict, reserved field, no type); nothing was written."""


class AuditKeyError(AuditError):
    """A signing or public key is missing, unreadable, too widely readable, or unknown."""
