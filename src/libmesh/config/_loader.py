"""Reading YAML files and directories into a :class:`ConfigSet`, with every finding kept."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._decode import decode_document
from ._findings import Codes, Finding
from ._kubernetes import (
    KubernetesService,
    decode_kubernetes_service,
    document_kind,
    is_kubernetes_service,
)
from ._resource import Resource, ResourceRef
from ._source import Location
from ._validate import validate_resource
from ._yaml import YAMLSyntaxError, parse_documents

__all__ = ["ConfigSet", "Fingerprint", "LoadResult", "Loader", "load", "load_text"]

YAML_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class ConfigSet:
    """The valid resources of a load, in the order they were read."""

    resources: tuple[Resource[Any], ...] = ()

    def of_kind(self, kind: str) -> tuple[Resource[Any], ...]:
        return tuple(r for r in self.resources if r.kind == kind)

    def get(self, ref: ResourceRef) -> Resource[Any] | None:
        return next((r for r in self.resources if r.ref == ref), None)

    def __len__(self) -> int:
        return len(self.resources)

    def __iter__(self) -> Iterator[Resource[Any]]:
        return iter(self.resources)


@dataclass(frozen=True)
class LoadResult:
    """What a load produced: the resources that passed, and every finding on the way.

    ``config`` holds only resources without errors; ``rejected`` the ones with errors (still
    typed, so analyzers and tools can look at them).
    """

    config: ConfigSet
    findings: tuple[Finding, ...]
    rejected: tuple[Resource[Any], ...] = ()
    files: tuple[str, ...] = field(default=())
    services: tuple[KubernetesService, ...] = ()

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.is_error)

    @property
    def ok(self) -> bool:
        return not self.errors


def iter_yaml_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Files named by ``paths``: files as given, directories walked in sorted order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.endswith(YAML_SUFFIXES) and not name.startswith("."):
                        yield Path(root) / name
        else:
            yield path


def load(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> LoadResult:
    """Load YAML files and directories (recursively) of Istio resources."""
    return Loader(paths).load()


def load_text(text: str, file: str = "<string>") -> LoadResult:
    """Load resources from YAML text; ``file`` names it in findings."""
    return _merge([_read_text(file, text)])


Fingerprint = tuple[tuple[str, int, int, int], ...]


# File systems stamp modification times from a coarse clock (a few milliseconds): two writes of
# the same size within one tick look alike. A file modified this recently when it was read is
# "racy" (git's word for it), and is compared by content until it is older.
_RACY_NS = 200_000_000


@dataclass(frozen=True)
class _Cached:
    stamp: tuple[int, int, int]  # mtime_ns, size, inode
    digest: bytes  # of the content
    racy: bool
    result: _FileResult


class Loader:
    """Loads the same files and directories again and again, re-reading only the files that
    changed since the last load: a one-line edit in a large mesh costs one file's parse."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = tuple(os.fspath(p) for p in paths)
        self._files: dict[str, _Cached] = {}
        self.loaded: Fingerprint = ()  # what the files were at the last load

    def changed(self) -> bool:
        """Whether the files differ from what the last load read."""
        if self.fingerprint() != self.loaded:
            return True
        for name, cached in self._files.items():
            if cached.racy and _digest(_read_bytes(name)) != cached.digest:
                return True
        return False

    def fingerprint(self) -> Fingerprint:
        """What the files are now (names, sizes and modification times): compare two to learn
        whether anything changed, without reading a file."""
        entries = []
        for path in iter_yaml_files(self.paths):
            try:
                stat = path.stat()
            except OSError:
                entries.append((str(path), -1, -1, -1))
                continue
            entries.append((str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(entries)

    def load(self) -> LoadResult:
        files: dict[str, _Cached] = {}
        self.loaded = self.fingerprint()
        for name, mtime, size, inode in self.loaded:
            stamp = (mtime, size, inode)
            cached = self._files.get(name)
            if cached is not None and cached.stamp == stamp and mtime >= 0 and not cached.racy:
                files[name] = cached
                continue
            data = _read_bytes(name)
            digest = _digest(data)
            racy = time.time_ns() - mtime < _RACY_NS
            if cached is not None and cached.digest == digest and not isinstance(data, OSError):
                files[name] = _Cached(stamp, digest, racy, cached.result)
            else:
                files[name] = _Cached(stamp, digest, racy, _decode_file(name, data))
        self._files = files
        return _merge([cached.result for cached in files.values()])


def _read_bytes(name: str) -> bytes | OSError:
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        return exc


def _digest(data: bytes | OSError) -> bytes:
    if isinstance(data, OSError):
        return b""
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class _FileResult:
    """One file, decoded and validated on its own: what does not depend on other files."""

    file: str
    findings: tuple[Finding, ...] = ()
    # each resource with whether it has errors
    resources: tuple[tuple[Resource[Any], bool], ...] = ()
    services: tuple[KubernetesService, ...] = ()


def _decode_file(name: str, data: bytes | OSError) -> _FileResult:
    try:
        if isinstance(data, OSError):
            raise data
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        finding = Finding(Codes.UNREADABLE_FILE, f"cannot read this file: {reason}", Location(name))
        return _FileResult(name, (finding,))
    return _read_text(name, text)


def _read_text(file: str, text: str) -> _FileResult:
    findings: list[Finding] = []
    resources: list[tuple[Resource[Any], bool]] = []
    services: list[KubernetesService] = []
    for doc in parse_documents(text, file):
        if isinstance(doc, YAMLSyntaxError):
            findings.append(
                Finding(Codes.INVALID_YAML, doc.message, doc.location, document=doc.index)
            )
            continue
        if is_kubernetes_service(*document_kind(doc.node)):
            service, service_findings = decode_kubernetes_service(doc)
            findings.extend(service_findings)
            if service is not None:
                services.append(service)
            continue
        resource, doc_findings = decode_document(doc, file)
        if resource is not None:
            doc_findings.extend(validate_resource(resource, doc_findings))
            resources.append((resource, any(f.is_error for f in doc_findings)))
        findings.extend(doc_findings)
    return _FileResult(file, tuple(findings), tuple(resources), tuple(services))


def _merge(files: Sequence[_FileResult]) -> LoadResult:
    findings: list[Finding] = []
    accepted: list[Resource[Any]] = []
    rejected: list[Resource[Any]] = []
    services: list[KubernetesService] = []
    first_seen: dict[ResourceRef, Resource[Any]] = {}
    for file in files:
        findings.extend(file.findings)
        services.extend(file.services)
        for resource, has_errors in file.resources:
            if has_errors:
                rejected.append(resource)
                continue
            earlier = first_seen.get(resource.ref)
            if earlier is not None:
                findings.append(
                    Finding(
                        Codes.DUPLICATE_RESOURCE,
                        f"{resource.ref} is already defined at {earlier.location}; "
                        "rename one of them or delete the copy",
                        resource.location,
                        resource=resource.ref,
                        path="metadata.name",
                        related=(earlier.ref,),
                    )
                )
                rejected.append(resource)
                continue
            first_seen[resource.ref] = resource
            accepted.append(resource)
    return LoadResult(
        config=ConfigSet(tuple(accepted)),
        findings=tuple(findings),
        rejected=tuple(rejected),
        files=tuple(file.file for file in files),
        services=tuple(services),
    )
