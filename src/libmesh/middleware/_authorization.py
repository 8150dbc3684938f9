"""The log lines the inbound middlewares write for authorization decisions (AUDIT matches and
denials); the decisions themselves are made in ``libmesh.policy``."""

from __future__ import annotations

import logging
from typing import Any

from ..policy._authz import Decision

__all__ = ["report_decision"]

logger = logging.getLogger("libmesh")


def report_decision(
    decision: Decision, method: str, path: str, client: Any, principal: str
) -> None:
    """Log what an operator wants to see: an AUDIT policy's match (Istio's AUDIT action asks
    for exactly that) and a denial, with the policy that decided."""
    if not decision.audited and decision.allowed:
        return
    caller = principal or (f"{client[0]} (plaintext)" if client else "an unknown caller")
    if decision.audited:
        logger.info(
            "libmesh: AUDIT %s %s from %s matched %s", method, path, caller, decision.audit_policy
        )
    if not decision.allowed:
        logger.info("libmesh: denied %s %s from %s: %s", method, path, caller, decision.reason)
