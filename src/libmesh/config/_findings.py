"""Findings: every problem validation or analysis reports, with its code, severity and place.

Codes are Istio's ``istioctl analyze`` codes (``IST0101`` …) where Istio has the same message,
and libmesh's own (``LM0001`` …) where it has none; ``docs/codes.md`` lists them all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from ._resource import ResourceRef
from ._source import NOWHERE, Location

__all__ = ["Code", "Finding", "Severity"]


class Severity(enum.IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Code:
    id: str
    name: str
    severity: Severity


class Codes:
    """The catalogue. Istio's numbering is kept so that Istio users recognise each message."""

    DEPRECATED = Code("IST0002", "Deprecated", Severity.WARNING)
    REFERENCED_RESOURCE_NOT_FOUND = Code("IST0101", "ReferencedResourceNotFound", Severity.ERROR)
    SCHEMA_VALIDATION_ERROR = Code("IST0106", "SchemaValidationError", Severity.ERROR)
    CONFLICTING_MESH_GATEWAY_VIRTUAL_SERVICE_HOSTS = Code(
        "IST0109", "ConflictingMeshGatewayVirtualServiceHosts", Severity.ERROR
    )
    VIRTUAL_SERVICE_DESTINATION_PORT_SELECTOR_REQUIRED = Code(
        "IST0112", "VirtualServiceDestinationPortSelectorRequired", Severity.ERROR
    )
    MTLS_POLICY_CONFLICT = Code("IST0113", "MTLSPolicyConflict", Severity.ERROR)
    NO_MATCHING_WORKLOADS_FOUND = Code("IST0127", "NoMatchingWorkloadsFound", Severity.WARNING)
    NO_SERVER_CERTIFICATE_VERIFICATION_DESTINATION_LEVEL = Code(
        "IST0128", "NoServerCertificateVerificationDestinationLevel", Severity.WARNING
    )
    NO_SERVER_CERTIFICATE_VERIFICATION_PORT_LEVEL = Code(
        "IST0129", "NoServerCertificateVerificationPortLevel", Severity.WARNING
    )
    VIRTUAL_SERVICE_UNREACHABLE_RULE = Code(
        "IST0130", "VirtualServiceUnreachableRule", Severity.WARNING
    )
    VIRTUAL_SERVICE_INEFFECTIVE_MATCH = Code(
        "IST0131", "VirtualServiceIneffectiveMatch", Severity.INFO
    )
    SCHEMA_WARNING = Code("IST0133", "SchemaWarning", Severity.WARNING)
    SERVICE_ENTRY_ADDRESSES_REQUIRED = Code(
        "IST0134", "ServiceEntryAddressesRequired", Severity.WARNING
    )
    NEGATIVE_CONDITION_STATUS = Code("IST0171", "NegativeConditionStatus", Severity.WARNING)
    DESTINATION_RULE_SUBSET_NOT_SELECT_PODS = Code(
        "IST0173", "DestinationRuleSubsetNotSelectPods", Severity.ERROR
    )
    UNKNOWN_DESTINATION_RULE_HOST = Code("IST0174", "UnknownDestinationRuleHost", Severity.WARNING)
    # libmesh's own
    UNSUPPORTED_KIND = Code("LM0001", "UnsupportedKind", Severity.WARNING)
    INVALID_YAML = Code("LM0002", "InvalidYAML", Severity.ERROR)
    NOT_A_RESOURCE = Code("LM0003", "NotAResource", Severity.ERROR)
    DUPLICATE_RESOURCE = Code("LM0004", "DuplicateResource", Severity.ERROR)
    UNREADABLE_FILE = Code("LM0005", "UnreadableFile", Severity.ERROR)
    CONFLICTING_DESTINATION_RULES = Code("LM0101", "ConflictingDestinationRules", Severity.ERROR)
    MERGED_DESTINATION_RULES = Code("LM0102", "MergedDestinationRules", Severity.WARNING)
    UNSUPPORTED_FEATURE = Code("LM0103", "UnsupportedFeature", Severity.WARNING)


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: what (``code``, ``message``), how bad (``severity``), and where."""

    code: Code
    message: str
    location: Location = NOWHERE
    resource: ResourceRef | None = None
    path: str = ""
    severity: Severity | None = None  # None: the code's own severity
    related: tuple[ResourceRef, ...] = ()
    document: int = 0  # 1-based index of the YAML document when the resource is unknown

    @property
    def level(self) -> Severity:
        return self.code.severity if self.severity is None else self.severity

    @property
    def is_error(self) -> bool:
        return self.level is Severity.ERROR

    def format(self, *, with_code: bool = False) -> str:
        """``file:line: Kind namespace/name: field.path: message`` (DESIGN.md §3)."""
        where = str(self.location) if self.location else "-"
        if self.resource is not None:
            subject = str(self.resource)
        elif self.document:
            subject = f"document {self.document}"
        else:
            subject = "-"
        text = self.message
        if with_code:
            text = f"{self.level} [{self.code.id}] {text}"
        elif self.level is not Severity.ERROR:
            text = f"{self.level}: {text}"
        return f"{where}: {subject}: {self.path or '-'}: {text}"

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code.id,
            "name": self.code.name,
            "severity": str(self.level),
            "message": self.message,
            "file": self.location.file,
            "line": self.location.line,
            "column": self.location.column,
            "resource": None
            if self.resource is None
            else {
                "kind": self.resource.kind,
                "namespace": self.resource.namespace,
                "name": self.resource.name,
            },
            "path": self.path,
            "related": [str(r) for r in self.related],
        }
