"""Verification of the symmetries the planned maps assume: the audit (:mod:`.audit`,
checks built from the plan's blocks in :mod:`.checks`, group actions in :mod:`.actions`,
results in :mod:`.report`). ``equiopt.audit`` re-exports it as a callable module."""

from .actions import Action, Check, Edit
from .audit import Auditor, audit, relies_on
from .command import ARCH_CHOICES, add_arguments, build_audit_model, run
from .report import (
    INFORMATIONAL_KINDS,
    KINDS,
    SHIFT_KINDS,
    STRUCTURE_KINDS,
    VERDICTS,
    AuditError,
    AuditReport,
    CheckResult,
    downgrade_rules,
)

__all__ = [
    "ARCH_CHOICES",
    "INFORMATIONAL_KINDS",
    "KINDS",
    "SHIFT_KINDS",
    "STRUCTURE_KINDS",
    "VERDICTS",
    "Action",
    "AuditError",
    "AuditReport",
    "Auditor",
    "Check",
    "CheckResult",
    "Edit",
    "add_arguments",
    "audit",
    "build_audit_model",
    "downgrade_rules",
    "relies_on",
    "run",
]
