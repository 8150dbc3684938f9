"""meshd, libmesh's control plane, and meshctl, its command-line tool.

``meshd --config-dir DIR`` serves a directory of Istio-style YAML over xDS v3;
:class:`Meshd` runs the same server inside a program (tests, embedding).
"""

from ._server import Meshd, Settings, StartupError

__all__ = ["Meshd", "Settings", "StartupError"]
