"""Workload identity: SPIFFE IDs, X.509-SVIDs (the key made in the process, the CSR, the
checks a certificate must pass to stand for a workload)."""

from ._spiffe import SpiffeId, SpiffeIdError
from ._svid import (
    Svid,
    SvidError,
    certificate_spiffe_id,
    make_csr,
    new_private_key,
    verify_svid,
)

__all__ = [
    "SpiffeId",
    "SpiffeIdError",
    "Svid",
    "SvidError",
    "certificate_spiffe_id",
    "make_csr",
    "new_private_key",
    "verify_svid",
]
