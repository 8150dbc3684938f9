"""libmesh-proxy: the mesh beside a program that cannot import libmesh (``libmesh-proxy
--help``). Its outbound side sends the program's HTTP through the same engine and transport as
a Python app's httpx client; its inbound side admits callers with the same middleware as
:func:`libmesh.serve`, so every decision is the library's."""

from ._envoy import find_envoy
from ._forward import Inbound, Outbound, forwarded_headers, xfcc
from ._main import main

__all__ = ["Inbound", "Outbound", "find_envoy", "forwarded_headers", "main", "xfcc"]
