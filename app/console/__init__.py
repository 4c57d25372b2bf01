"""The edit console: one static page at ``/console`` that drives the JSON API from the browser.

No build step and nothing from a CDN: the HTML, the JavaScript modules and the stylesheet ship
in ``static/`` with the package. The page holds no data of its own; it reads and writes through
the same endpoints as any client, with the user's API key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

# The page runs its own scripts only (no inline script, nothing from elsewhere) and talks to this
# origin only: text that slipped into markup could not run.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def install_console(app: FastAPI) -> None:
    """Serve the page at ``/console`` and its assets under ``/console/static/``."""

    @app.get("/console", include_in_schema=False)
    def console_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console-static")
