"""grpcio's own xDS client, driven by a test through stdin, in a process of its own (grpcio
reads its bootstrap once per process).

    GRPC_XDS_BOOTSTRAP=bootstrap.json python grpc_xds_client.py xds:///host:port

Each line on stdin is a JSON command, ``{"calls": 100, "metadata": {"x-fault": "yes"}}``; the
answer is one JSON line counting the outcomes: the name of the instance that answered, or
``CODE: details`` for a failed call.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import grpc


def main(target: str) -> None:
    channel = grpc.insecure_channel(target)
    who = channel.unary_unary("/test.Echo/Who")
    for line in sys.stdin:
        command = json.loads(line)
        metadata = tuple(command.get("metadata", {}).items())
        outcomes: Counter[str] = Counter()
        for _ in range(int(command["calls"])):
            try:
                outcomes[who(b"", timeout=10, metadata=metadata).decode()] += 1
            except grpc.RpcError as exc:
                outcomes[f"{exc.code().name}: {exc.details()}"] += 1  # type: ignore[attr-defined]
        print(json.dumps(outcomes), flush=True)
    channel.close()


if __name__ == "__main__":
    main(sys.argv[1])
