"""Loading a directory again reads only what changed, and sees every change."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from libmesh.config import Codes, Loader, LoadResult, Resource, ResourceRef, load_text

ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [{name}.shop.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {address}}}]
"""


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    # A later edit within the same clock tick must still look different.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def _entry(result: LoadResult, name: str) -> Resource[Any] | None:
    return result.config.get(ResourceRef("ServiceEntry", "shop", name))


def _address(result: LoadResult, name: str) -> str:
    entry = _entry(result, name)
    assert entry is not None
    return str(entry.spec.endpoints[0].address)


def test_an_unchanged_file_is_not_read_again(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", ENTRY.format(name="a", address="10.0.0.1"))
    _write(tmp_path / "b.yaml", ENTRY.format(name="b", address="10.0.0.2"))
    loader = Loader(tmp_path)
    first = loader.load()

    _write(tmp_path / "b.yaml", ENTRY.format(name="b", address="10.0.0.3"))
    assert loader.changed()
    second = loader.load()

    assert _entry(second, "a") is _entry(first, "a")  # the same object: not parsed again
    assert _address(second, "b") == "10.0.0.3"
    assert not loader.changed()


def test_a_new_file_and_a_deleted_file_are_seen(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", ENTRY.format(name="a", address="10.0.0.1"))
    loader = Loader(tmp_path)
    loader.load()

    _write(tmp_path / "c.yaml", ENTRY.format(name="c", address="10.0.0.9"))
    assert _entry(loader.load(), "c") is not None

    (tmp_path / "a.yaml").unlink()
    assert loader.changed()
    result = loader.load()
    assert _entry(result, "a") is None
    assert result.files == (str(tmp_path / "c.yaml"),)


def test_a_duplicate_across_files_is_found_after_an_edit(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", ENTRY.format(name="a", address="10.0.0.1"))
    _write(tmp_path / "b.yaml", ENTRY.format(name="b", address="10.0.0.2"))
    loader = Loader(tmp_path)
    assert loader.load().ok

    _write(tmp_path / "b.yaml", ENTRY.format(name="a", address="10.0.0.2"))
    result = loader.load()

    (duplicate,) = result.errors
    assert duplicate.code == Codes.DUPLICATE_RESOURCE
    assert duplicate.location.file == str(tmp_path / "b.yaml")
    assert _address(result, "a") == "10.0.0.1"


def test_a_file_named_but_missing_is_reported_until_it_appears(tmp_path: Path) -> None:
    missing = tmp_path / "later.yaml"
    loader = Loader([missing])
    (problem,) = loader.load().errors
    assert problem.code == Codes.UNREADABLE_FILE

    _write(missing, ENTRY.format(name="a", address="10.0.0.1"))
    assert loader.changed()
    assert loader.load().ok


def test_a_same_size_rewrite_within_one_clock_tick_is_still_seen(tmp_path: Path) -> None:
    # File systems stamp times from a coarse clock: the rewrite may carry the same mtime.
    path = tmp_path / "a.yaml"
    path.write_text(ENTRY.format(name="a", address="10.0.0.1"))
    loader = Loader(tmp_path)
    loader.load()
    stamp = path.stat()

    path.write_text(ENTRY.format(name="a", address="10.0.0.2"))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))

    assert loader.changed()
    assert _address(loader.load(), "a") == "10.0.0.2"


def test_an_empty_value_under_a_number_tag_is_a_finding_not_a_crash() -> None:
    # PyYAML's own float and int constructors index into the empty string
    result = load_text(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        "metadata: {name: d, namespace: x}\n"
        "spec:\n  address: 1.2.3.4\n  network: !!float ''\n  weight: !!int ''\n",
        "mesh.yaml",
    )
    assert [e.format() for e in result.errors] == [
        "mesh.yaml:6: WorkloadEntry x/d: spec.network: this value cannot be read as its tag "
        "!!float says (IndexError)",
        "mesh.yaml:7: WorkloadEntry x/d: spec.weight: this value cannot be read as its tag "
        "!!int says (IndexError)",
    ]
