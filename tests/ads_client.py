"""A bare ADS stream for protocol tests: the test decides every request it sends."""

from __future__ import annotations

import queue
import threading
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from libmesh.xds import MESSAGE_TYPES

_METHODS = {
    False: "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    True: "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
}


def node(node_id: str, metadata: dict[str, Any] | None = None, **fields: Any) -> base_pb2.Node:
    proto = base_pb2.Node(id=node_id, **fields)
    json_format.ParseDict(metadata or {}, proto.metadata)
    return proto


class RawAds:
    """One stream; ``send`` a request, ``receive`` the next response (or ``None``)."""

    def __init__(self, address: str, *, delta: bool = False) -> None:
        self.delta = delta
        self.channel = grpc.insecure_channel(address)
        request_type = (
            discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
        )
        response_type = (
            discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse
        )
        method = self.channel.stream_stream(
            _METHODS[delta],
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        self._requests: queue.Queue[Message | None] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self.call = method(iter(self._requests.get, None))
        self.error: grpc.RpcError | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._responses.put(response)
        except grpc.RpcError as exc:
            self.error = exc
        self._responses.put(None)

    def send(self, **fields: Any) -> None:
        message_type = (
            discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        )
        self._requests.put(message_type(**fields))

    def receive(self, timeout: float = 10.0) -> Any:
        """The next response; fails the test when none comes in time."""
        try:
            response = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no response within {timeout}s") from None
        if response is None:
            raise AssertionError(f"the stream ended: {self.error}")
        return response

    def nothing(self, wait: float = 0.5) -> bool:
        """Whether no response arrives within ``wait`` seconds."""
        try:
            response = self._responses.get(timeout=wait)
        except queue.Empty:
            return True
        self._responses.put(response)
        return False

    def ack(self, response: Any, names: list[str] | None = None) -> None:
        if self.delta:
            self.send(type_url=response.type_url, response_nonce=response.nonce)
        else:
            self.send(
                type_url=response.type_url,
                version_info=response.version_info,
                response_nonce=response.nonce,
                resource_names=names or [],
            )

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self.channel.close()
        self._reader.join(timeout=5)


def unpack(response: Any) -> dict[str, Message]:
    """The resources of a response, by name."""
    result = {}
    for entry in response.resources:
        any_ = entry.resource if hasattr(entry, "resource") else entry
        message = MESSAGE_TYPES[any_.type_url]()
        any_.Unpack(message)
        if hasattr(entry, "resource"):
            name = entry.name
        else:
            name = getattr(message, "name", "") or getattr(message, "cluster_name", "")
        result[name] = message
    return result
