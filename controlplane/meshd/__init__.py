"""meshd, libmesh's control plane, and meshctl, its command-line tool."""

__all__: list[str] = []
