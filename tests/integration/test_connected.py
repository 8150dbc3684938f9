"""libmesh configured by a real meshd: the same routing as from files, edits followed, and
the control plane's failures survived: killed under load, down at start-up, fed a bad edit."""

from __future__ import annotations

import asyncio
import random
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import libmesh
from tests.conftest import Backends, service
from tests.meshd_process import MeshdProcess

from .conftest import Caller

URL = "http://reviews.shop.svc.cluster.local:8080"
Connect = Callable[[libmesh.Mesh], Caller]
StartBackends = Callable[[int], Backends]
StartMeshd = Callable[..., MeshdProcess]


def canary(v1: int, v2: int) -> str:
    return f"""
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{name: reviews, namespace: shop}}
    spec:
      host: reviews
      subsets:
      - {{name: v1, labels: {{version: v1}}}}
      - {{name: v2, labels: {{version: v2}}}}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: reviews, namespace: shop}}
    spec:
      hosts: [reviews]
      http:
      - route:
        - {{destination: {{host: reviews, subset: v1}}, weight: {v1}}}
        - {{destination: {{host: reviews, subset: v2}}, weight: {v2}}}
        retries: {{attempts: 3, retryOn: "5xx,connect-failure,reset"}}
    """


def instance(response: httpx.Response) -> str:
    return str(response.json()["instance"])


def write_mesh(directory: Path, backends: Backends, v1: int, v2: int) -> None:
    registry = service(
        "reviews", "shop", backends.ports, labels=[{"version": "v1"}, {"version": "v2"}]
    )
    (directory / "mesh.yaml").write_text(registry + "\n---\n" + textwrap.dedent(canary(v1, v2)))


@pytest.fixture
def backends(start_backends: StartBackends) -> Backends:
    return start_backends(2)


def connect_mesh(meshd: MeshdProcess, tmp_path: Path, **options: object) -> libmesh.Mesh:
    settings: dict[str, object] = {
        "namespace": "shop",
        "wait": 10.0,
        "state_file": tmp_path / "state" / "xds.state",
        "rng": random.Random(7),
    }
    settings.update(options)
    return libmesh.Mesh.connect(meshd.xds_address, **settings)  # type: ignore[arg-type]


def test_meshd_configures_the_same_canary_as_local_files(
    backends: Backends, tmp_path: Path, start_meshd: StartMeshd, connect: Connect
) -> None:
    write_mesh(tmp_path, backends, 90, 10)
    meshd = start_meshd(tmp_path)
    connected = connect(connect_mesh(meshd, tmp_path))
    local = connect(libmesh.Mesh.from_files(tmp_path, namespace="shop", watch=False))

    from_meshd = Counter(instance(r) for r in connected.gets(1000, URL + "/r"))
    from_files = Counter(instance(r) for r in local.gets(1000, URL + "/r"))

    assert from_meshd == from_files == {"instance-0": 900, "instance-1": 100}
    assert (
        connected.mesh.engine.version
        == meshd.client(connected.mesh.node.id)["types"]["lds"]["acked_version"]
    )


def test_an_edit_of_the_yaml_reaches_the_client(
    backends: Backends, tmp_path: Path, start_meshd: StartMeshd, connect: Connect
) -> None:
    write_mesh(tmp_path, backends, 100, 0)
    meshd = start_meshd(tmp_path)
    caller = connect(connect_mesh(meshd, tmp_path))
    assert {instance(r) for r in caller.gets(20, URL + "/r")} == {"instance-0"}

    write_mesh(tmp_path, backends, 0, 100)

    meshd.wait_until(lambda: instance(caller.get(URL + "/r")) == "instance-1", what="the shift")
    assert {instance(r) for r in caller.gets(20, URL + "/r")} == {"instance-1"}


def test_an_invalid_edit_leaves_clients_on_the_last_good_configuration(
    backends: Backends, tmp_path: Path, start_meshd: StartMeshd, connect: Connect
) -> None:
    write_mesh(tmp_path, backends, 0, 100)
    meshd = start_meshd(tmp_path)
    caller = connect(connect_mesh(meshd, tmp_path))
    version = caller.mesh.engine.version

    write_mesh(tmp_path, backends, 90, 20)
    meshd.wait_for_log("configuration change rejected")

    assert caller.mesh.engine.version == version
    assert {instance(r) for r in caller.gets(20, URL + "/r")} == {"instance-1"}


def test_a_process_that_registers_itself_takes_traffic_while_healthy_and_connected(
    backends: Backends, tmp_path: Path, start_meshd: StartMeshd, connect: Connect
) -> None:
    # Only instance-0 is declared; instance-1 joins as the process that serves it would.
    registry = service("reviews", "shop", backends.ports[:1], labels=[{"version": "v1"}])
    (tmp_path / "mesh.yaml").write_text(registry + "\n---\n" + textwrap.dedent(canary(100, 0)))
    meshd = start_meshd(tmp_path, "--registration-grace", "300ms")
    caller = connect(connect_mesh(meshd, tmp_path))

    def answering() -> set[str]:
        return {instance(r) for r in caller.gets(20, URL + "/r")}

    assert answering() == {"instance-0"}

    workload = connect_mesh(
        meshd,
        tmp_path,
        node_id="reviews-v1-b.shop",
        labels={"app": "reviews", "version": "v1"},
        ports={"http": backends.ports[1]},
        workload_address="127.0.0.1",
        state_file=None,
    )
    try:
        meshd.wait_until(lambda: answering() == {"instance-0", "instance-1"}, what="joining")

        workload.report_health(False, "database unreachable")
        meshd.wait_for_log("reports unhealthy: database unreachable")
        meshd.wait_until(lambda: answering() == {"instance-0"}, what="the unhealthy endpoint")

        workload.report_health(True)
        meshd.wait_until(lambda: answering() == {"instance-0", "instance-1"}, what="recovery")
    finally:
        workload.close()
    meshd.wait_for_log("reviews-v1-b deregistered")
    meshd.wait_until(lambda: answering() == {"instance-0"}, what="leaving")


def test_meshd_killed_and_restarted_under_load_fails_no_request(
    backends: Backends, tmp_path: Path, start_meshd: StartMeshd
) -> None:
    write_mesh(tmp_path, backends, 50, 50)
    meshd = start_meshd(tmp_path)
    meshes = [
        connect_mesh(meshd, tmp_path, node_id=f"app-{i}.shop", state_file=None) for i in range(3)
    ]
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def load(mesh: libmesh.Mesh) -> None:
        with mesh.client(timeout=10) as client:
            while not stop.is_set():
                try:
                    status = str(client.get(URL + "/r").status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    outcomes[status] += 1

    workers = [threading.Thread(target=load, args=(m,)) for m in meshes for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.5)
        meshd.kill()
        time.sleep(1.5)  # the clients lose their stream and keep serving what they have
        during = sum(outcomes.values())
        meshd.restart()
        meshd.wait_until(
            lambda: (
                len(meshd.clients()) == 3
                and all(
                    t["status"] == "SYNCED" for c in meshd.clients() for t in c["types"].values()
                )
            ),
            timeout=20,
            what="every client to resync",
        )
        time.sleep(0.3)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        for mesh in meshes:
            mesh.close()

    assert set(outcomes) == {"200"}, outcomes
    assert outcomes["200"] > during > 0
    assert all(m.xds_status is not None and m.xds_status.reconnects >= 1 for m in meshes)


def test_an_app_restarted_while_meshd_is_down_serves_its_saved_configuration(
    backends: Backends, tmp_path: Path, start_meshd: StartMeshd
) -> None:
    write_mesh(tmp_path, backends, 0, 100)
    meshd = start_meshd(tmp_path)
    first = connect_mesh(meshd, tmp_path)
    version = first.engine.version
    first.close()
    meshd.kill()

    started = time.monotonic()
    mesh = connect_mesh(meshd, tmp_path, wait=10.0)
    waited = time.monotonic() - started

    try:
        assert waited < 3  # the saved configuration is used as soon as meshd proves unreachable
        assert mesh.xds_status is not None
        assert mesh.xds_status.from_saved_state
        assert mesh.engine.version == version
        with mesh.client() as client:
            assert {instance(client.get(URL + "/r")) for _ in range(10)} == {"instance-1"}

        meshd.restart()
        meshd.wait_until(
            lambda: mesh.xds_status is not None and not mesh.xds_status.from_saved_state,
            timeout=20,
            what="the client to reconnect",
        )
    finally:
        mesh.close()


def test_without_meshd_or_a_saved_configuration_connect_fails_clearly(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(libmesh.ConfigTimeout) as raised:
        libmesh.Mesh.connect("127.0.0.1:9", wait=1.0, state_file=tmp_path / "none.state")

    assert time.monotonic() - started < 3
    message = str(raised.value)
    assert "no configuration from the control plane at 127.0.0.1:9 within 1.0s" in message
    assert "UNAVAILABLE" in message
    assert str(tmp_path / "none.state") in message
    assert isinstance(raised.value, TimeoutError)


def test_an_asyncio_app_connects_without_blocking_its_loop(
    backends: Backends, tmp_path: Path, start_meshd: StartMeshd
) -> None:
    write_mesh(tmp_path, backends, 100, 0)
    meshd = start_meshd(tmp_path)

    async def app() -> str:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.create_task(tick())
        mesh = await libmesh.Mesh.aconnect(meshd.xds_address, namespace="shop", state_file=None)
        ticker.cancel()
        assert ticks > 0  # the loop kept running while the mesh connected
        try:
            async with mesh.async_client() as client:
                return instance(await client.get(URL + "/r"))
        finally:
            mesh.close()

    assert asyncio.run(app()) == "instance-0"
