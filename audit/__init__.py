"""Tamper-evident audit log: append-only records, Merkle tree, signed checkpoints, verification, reports.

`audit.log.AuditLog` writes; `audit.verify.verify_log` checks; `audit.report` answers auditors' questions.
This package depends on the standard library and `cryptography` only.
"""
