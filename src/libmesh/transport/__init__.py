"""Transports: thin adapters that drive the engine's calls over real clients."""

from ._httpx import AsyncMeshTransport, MeshInfo, MeshTransport

__all__ = ["AsyncMeshTransport", "MeshInfo", "MeshTransport"]
