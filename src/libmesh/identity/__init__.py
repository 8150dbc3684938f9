"""Workload identity: SPIFFE IDs, X.509-SVIDs (the key made in the process, the CSR, the
checks a certificate must pass to stand for a workload)."""

from ._sds import SdsServer
from ._spiffe import SpiffeId, SpiffeIdError
from ._svid import (
    Svid,
    SvidError,
    certificate_spiffe_id,
    make_csr,
    new_private_key,
    verify_svid,
)
from ._tls import grpc_server_credentials
from ._workload import IdentityError, WorkloadIdentity

__all__ = [
    "IdentityError",
    "SdsServer",
    "SpiffeId",
    "SpiffeIdError",
    "Svid",
    "SvidError",
    "WorkloadIdentity",
    "certificate_spiffe_id",
    "grpc_server_credentials",
    "make_csr",
    "new_private_key",
    "verify_svid",
]
