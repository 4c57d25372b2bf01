"""Refusing request bodies over ``SCEN_MAX_BODY_BYTES`` (413) before they are read in full or parsed.

Starlette's own limit answers in plain text, replacing whatever the app answered once a
declared length is too large; this one answers with the service's error body.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, self._message, "body_too_large", {"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            # A body sent without a length (chunked) is counted as it arrives. The route that
            # reads it passes an HTTPException on to the error handlers, which answer 413.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message)
            return message

        await self.app(scope, counted_receive, send)

    @property
    def _message(self) -> str:
        return f"the request body is over {self.max_bytes} bytes"
