"""Mesh-wide settings: the few parts of Istio's MeshConfig that change how config is read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

from .._exceptions import ConfigError
from ._hosts import DEFAULT_DOMAIN

__all__ = ["MeshSettings", "load_mesh_settings"]


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """``root_namespace``: policies here without a selector apply mesh-wide (Istio's default
    is ``istio-system``). ``domain``: the suffix of short host names. ``dns_auto_allocate``:
    whether TCP ServiceEntries get virtual IPs automatically, as Istio's DNS proxy does."""

    root_namespace: str = "istio-system"
    domain: str = DEFAULT_DOMAIN
    dns_auto_allocate: bool = False


def load_mesh_settings(path: str | os.PathLike[str]) -> MeshSettings:
    """Read an Istio MeshConfig YAML file (as given to ``istioctl analyze --meshConfigFile``)."""
    try:
        with open(path, encoding="utf-8") as f:
            document: Any = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read mesh config {os.fspath(path)}: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{os.fspath(path)}: a mesh config must be a mapping of settings")
    default_config = document.get("defaultConfig") or {}
    metadata = (
        (default_config.get("proxyMetadata") or {}) if isinstance(default_config, dict) else {}
    )
    dns_capture = metadata.get("ISTIO_META_DNS_CAPTURE") == "true"
    auto_allocate = dns_capture and (
        metadata.get("ISTIO_META_DNS_AUTO_ALLOCATE") == "true"
        or metadata.get("PILOT_ENABLE_IP_AUTOALLOCATE") == "true"
    )
    return MeshSettings(
        root_namespace=str(document.get("rootNamespace") or "istio-system"),
        domain=str(document.get("clusterDomain") or DEFAULT_DOMAIN),
        dns_auto_allocate=auto_allocate,
    )
