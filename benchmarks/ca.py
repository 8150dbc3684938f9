"""How many X.509-SVIDs meshd's certificate authority signs per second, on one core.

    .venv/bin/python benchmarks/ca.py                 # about 10 s
    .venv/bin/python benchmarks/ca.py --csrs 2000 --json

The CSRs (ECDSA P-256, each for its own SPIFFE ID) are made first and not timed: making a key
is the workload's work. Then the CA (an ECDSA P-256 root, as meshd makes on first start) signs
them one after another in this process, each into a 24-hour SVID, and each chain is parsed back
as the workload would. Target (issue 6): at least 1000 SVIDs/s on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from libmesh.identity import SpiffeId, make_csr, new_private_key
from meshd._ca import CertificateAuthority

TARGET_PER_SECOND = 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csrs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        ca = CertificateAuthority.load_or_create(Path(scratch))
        requests = []
        for index in range(args.csrs):
            identity = SpiffeId.for_workload("cluster.local", "bench", f"sa-{index}")
            csr = make_csr(new_private_key(), identity)
            requests.append((csr.public_bytes(serialization.Encoding.PEM), identity))
        rates = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            for pem, identity in requests:
                chain = ca.sign(pem, identity)
                x509.load_pem_x509_certificate(chain[0].encode())
            rates.append(len(requests) / (time.perf_counter() - started))
    best, median = max(rates), sorted(rates)[len(rates) // 2]
    result = {"csrs": args.csrs, "svids_per_second_median": median, "svids_per_second_best": best,
              "target": TARGET_PER_SECOND, "ratio": median / TARGET_PER_SECOND}  # fmt: skip
    out = sys.stderr if args.json else sys.stdout
    print(
        f"CA signing, one core: {median:.0f} SVIDs/s (median of {args.rounds} rounds of "
        f"{args.csrs}; best {best:.0f}) = {median / TARGET_PER_SECOND:.2f}x the target of "
        f"{TARGET_PER_SECOND:.0f}/s",
        file=out,
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
