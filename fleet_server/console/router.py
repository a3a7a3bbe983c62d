"""Serving the console: ``/ui`` answers the single page, ``/ui/static`` its scripts and styles. The page is public
(it holds no data); every figure it shows comes from the API with the signed-in token.

A strict Content-Security-Policy: only this server's own scripts, styles and images (no inline script, no CDN),
and the page may not be framed."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new release's console is picked up at the next load
}


def mount_console(app: FastAPI) -> None:
    """Adds the console's page and its static files to ``app`` (its API router is included with the others, so
    the request guard knows its routes)."""

    @app.get("/ui", include_in_schema=False)
    def console_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)

    @app.get("/ui/", include_in_schema=False)
    def console_slash() -> RedirectResponse:
        return RedirectResponse("/ui")

    app.mount("/ui/static", _Static(directory=STATIC), name="console-static")


class _Static(StaticFiles):
    """StaticFiles with the console's security headers on every answer."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response
