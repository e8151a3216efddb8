"""A synchronous test client over httpx's in-process ASGI transport (one event loop per call),
for the unit tests of the HTTP apps (the services' app, the serving front end)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx


class AsgiClient:
    def __init__(
        self, app: Any, *, raise_app_exceptions: bool = True, base_url: str = "http://ppml.test"
    ) -> None:
        self._transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        self._base_url = base_url

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(
                transport=self._transport, base_url=self._base_url
            ) as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(go())

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)
