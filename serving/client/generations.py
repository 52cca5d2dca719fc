"""Async client of the gateway's REST live generations (`/v1/generations`, aiohttp): start one
and read its server-sent events, steer it, cancel it.

    async with GenerationsClient("http://localhost:8080") as client:
        async with client.start({"prompt": "a red circle", "steps": 25}) as live:
            async for event in live:          # Event(name, data)
                if event.name == "generation.progress" and event.data["step"] == 5:
                    await client.steer(live.id, prompt="a blue square")

Errors before the stream starts, and errors of steer / cancel, raise `GenerationError` with the
HTTP status and the OpenAI-shaped body; an `error` event is an Event like any other, the last.
"""

from contextlib import asynccontextmanager
from dataclasses import dataclass
import json

import aiohttp


@dataclass
class Event:
    name: str
    data: dict


class GenerationError(Exception):
    def __init__(self, status: int, body: dict, headers=None):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status}: {error.get('message', body)}")
        self.status, self.body, self.headers = status, body, dict(headers or {})
        self.param, self.code = error.get("param"), error.get("code")


class GenerationStream:
    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response
        self.id = response.headers["X-Generation-Id"]
        self.headers = dict(response.headers)

    async def __aiter__(self):
        name, data = None, []
        async for raw in self.response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif not line and name is not None:
                yield Event(name, json.loads("\n".join(data)))
                name, data = None, []


class GenerationsClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 300.0):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.session.close()

    @asynccontextmanager
    async def start(self, body: dict):
        """The live generation (its id and event stream); leaving the block closes the stream,
        which cancels a generation still running."""
        async with self.session.post(f"{self.base_url}/v1/generations", json=body) as response:
            if response.status != 200:
                raise GenerationError(response.status, await _body(response), response.headers)
            yield GenerationStream(response)

    async def steer(self, generation_id: str, **fields) -> tuple:
        """(the answer's JSON {id, steer_id}, its headers); GenerationError unless 202."""
        return await self._call("POST", f"/v1/generations/{generation_id}/steer", fields, 202)

    async def cancel(self, generation_id: str) -> tuple:
        return await self._call("DELETE", f"/v1/generations/{generation_id}", None, 200)

    async def _call(self, method: str, path: str, body, expected: int) -> tuple:
        async with self.session.request(method, self.base_url + path, json=body) as response:
            answer = await _body(response)
            if response.status != expected:
                raise GenerationError(response.status, answer, response.headers)
            return answer, dict(response.headers)


async def _body(response) -> dict:
    try:
        return await response.json(content_type=None)
    except (json.JSONDecodeError, aiohttp.ContentTypeError):
        return {"error": {"message": await response.text()}}
