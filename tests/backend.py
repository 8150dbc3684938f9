"""A small HTTP/1.1 backend for the integration tests, run as its own process.

    python tests/backend.py N        # serve N instances on free ports of 127.0.0.1

It prints one JSON line with the ports, then serves until stdin closes (so it never outlives
the test that started it). Each instance answers every request with its name and what it saw,
and can be told how to misbehave through ``/_backend/...`` paths:

    POST /_backend/behave?status=503&delay=0.2&reset=0&fail_first=2
    GET  /_backend/stats          -> {"requests": 12, "paths": {...}, "hosts": {...}}
    POST /_backend/clear

``status``: the status to answer with (after ``fail_first`` requests fail with it, the rest
succeed, when ``fail_first`` is set); ``delay``: seconds before answering; ``reset``: close the
connection without answering.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11


@dataclass
class Behaviour:
    status: int = 200
    delay: float = 0.0
    reset: bool = False
    fail_first: int = 0  # when > 0: only the first N requests misbehave


@dataclass
class Instance:
    name: str
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: int = 0
    misbehaved: int = 0
    paths: Counter[str] = field(default_factory=Counter)
    hosts: Counter[str] = field(default_factory=Counter)
    headers: list[dict[str, str]] = field(default_factory=list)

    def stats(self) -> dict[str, object]:
        return {
            "name": self.name,
            "requests": self.requests,
            "paths": dict(self.paths),
            "hosts": dict(self.hosts),
            "last_headers": self.headers[-1] if self.headers else {},
        }


async def handle(
    instance: Instance, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.SEND_BODY:
                    break
                continue
            if isinstance(event, h11.Request):
                body = b""
                while True:
                    more = conn.next_event()
                    if more is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                        continue
                    if isinstance(more, h11.Data):
                        body += more.data
                        continue
                    break
                if not await respond(instance, conn, writer, event, body):
                    break
                if conn.our_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
                continue
            break
    except (h11.RemoteProtocolError, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def respond(
    instance: Instance, conn: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request,
    body: bytes,
) -> bool:  # fmt: skip
    target = request.target.decode()
    url = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    headers = {k.decode().lower(): v.decode() for k, v in request.headers}
    if url.path.startswith("/_backend/"):
        if url.path == "/_backend/behave":
            instance.behaviour = Behaviour(
                status=int(query.get("status", 200)),
                delay=float(query.get("delay", 0)),
                reset=query.get("reset", "0") == "1",
                fail_first=int(query.get("fail_first", 0)),
            )
            instance.misbehaved = 0
            payload: object = {"ok": True}
        elif url.path == "/_backend/clear":
            instance.requests = instance.misbehaved = 0
            instance.paths.clear()
            instance.hosts.clear()
            instance.headers.clear()
            payload = {"ok": True}
        else:
            payload = instance.stats()
        await send(conn, writer, 200, json.dumps(payload).encode(), "application/json")
        return True
    instance.requests += 1
    instance.paths[url.path] += 1
    instance.hosts[headers.get("host", "")] += 1
    instance.headers.append(headers)
    behaviour = instance.behaviour
    misbehave = behaviour.fail_first == 0 or instance.misbehaved < behaviour.fail_first
    if misbehave:
        instance.misbehaved += 1
    if behaviour.delay and misbehave:
        await asyncio.sleep(behaviour.delay)
    if behaviour.reset and misbehave:
        writer.transport.abort()
        return False
    status = behaviour.status if misbehave else 200
    reply = {
        "instance": instance.name,
        "path": target,
        "method": request.method.decode(),
        "host": headers.get("host"),
        "headers": headers,
        "body": body.decode(errors="replace"),
    }
    await send(conn, writer, status, json.dumps(reply).encode(), "application/json")
    return True


async def send(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes, kind: str
) -> None:
    response = h11.Response(
        status_code=status,
        headers=[("content-type", kind), ("content-length", str(len(body)))],
    )
    writer.write(
        conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    )
    await writer.drain()


async def main(count: int) -> None:
    servers = []
    ports = []
    for i in range(count):
        instance = Instance(f"instance-{i}")
        server = await asyncio.start_server(
            lambda r, w, inst=instance: handle(inst, r, w), "127.0.0.1", 0
        )
        servers.append(server)
        ports.append(server.sockets[0].getsockname()[1])
    print(json.dumps({"ports": ports}), flush=True)
    loop = asyncio.get_running_loop()
    # Serve until the parent closes our stdin: a crashed test cannot leave us behind.
    await loop.run_in_executor(None, sys.stdin.read)
    for server in servers:
        server.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
