"""Cross-origin access to the receiver's HTTP API, for pages served from other origins.

A browser page (a web sender, a dashboard) on another origin may POST /offer and GET /stats
only if the receiver says so. Allowed origins are configured (``--cors-origin``, repeatable,
``*`` for any); with none, no CORS header is sent and browsers keep the API same-origin.
The token still applies: CORS only lets a page *ask*, ``Authorization: Bearer`` decides.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

log = logging.getLogger(__name__)

ALLOWED_HEADERS = "Authorization, Content-Type"
MAX_AGE_S = 600  # browsers may cache a preflight this long


class Cors:
    """Adds CORS headers to the given paths' responses and answers their OPTIONS preflights."""

    def __init__(self, origins: Iterable[str], paths: dict[str, str]) -> None:
        """``paths``: path -> the methods a page may use on it (e.g. ``{"/offer": "POST"}``)."""
        self.origins = {o.rstrip("/") for o in origins}
        self.paths = paths

    def allowed(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for a request from ``origin``, or None."""
        if not origin or not self.origins:
            return None
        if "*" in self.origins:
            return "*"
        return origin if origin.rstrip("/") in self.origins else None

    def install(self, app: web.Application) -> None:
        for path in self.paths:
            app.router.add_route("OPTIONS", path, self.preflight)
        app.middlewares.append(self.middleware)

    async def preflight(self, request: web.Request) -> web.Response:
        allow = self.allowed(request.headers.get("Origin"))
        if allow is None:
            return web.Response(status=403, text="origin not allowed")
        return web.Response(status=204, headers={
            **self._headers(allow),
            "Access-Control-Allow-Methods": f"{self.paths[request.path]}, OPTIONS",
            "Access-Control-Allow-Headers": ALLOWED_HEADERS,
            "Access-Control-Max-Age": str(MAX_AGE_S),
        })

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        cross = request.path in self.paths and request.method != "OPTIONS"
        try:
            response = await handler(request)
        except web.HTTPException as e:  # errors (413, 405...) must be readable cross-origin too
            if cross:
                self._add(request, e)
            raise
        if cross:
            self._add(request, response)
        return response

    def _add(self, request: web.Request, response: web.StreamResponse) -> None:
        allow = self.allowed(request.headers.get("Origin"))
        if allow is not None and not response.prepared:
            response.headers.update(self._headers(allow))

    @staticmethod
    def _headers(allow: str) -> dict[str, str]:
        # Vary: a cache must not hand one origin's answer to another
        return {"Access-Control-Allow-Origin": allow, "Vary": "Origin"}
