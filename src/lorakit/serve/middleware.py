"""The ASGI layer around the routes: the body limit, and the answer to an unexpected error.

`BodyLimit` counts a request's body as it streams in, so a chunked upload (no Content-Length)
stops at the limit too: the app's `receive` raises past the limit, whatever the app then answers
is dropped, and the client gets a 413 (uvicorn stops reading the socket while a body waits, so
what lies past the limit is never read into memory). A declared Content-Length over the limit is
answered before the app runs.

`InternalErrors` turns an exception that no handler took into a 500 that tells the client
nothing of the server, only a request id; the log has the traceback under that id. The app then
returns normally, so the server keeps the client's keep-alive connection open.

Both answer in the app's error shape, `error_body(code, message)`: lorakit's own by default,
OpenAI's on the generation server.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BodyTooLargeError, lorakit_error

ErrorBody = Callable[[str, str], dict]  # (code, message) -> the JSON body of an error answer

log = logging.getLogger("lorakit.serve")


class _BodyTooLarge(HTTPException):
    """Raised from `receive`; an HTTPException, which FastAPI passes on as it is."""

    def __init__(self) -> None:
        super().__init__(status_code=BodyTooLargeError.status)


class BodyLimit:
    """Refuses (413) a request body of more than `max_bytes`; `hint` says what fits."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, hint: str = "", error_body: ErrorBody = lorakit_error
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.hint = hint
        self.error_body = error_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, f"has {int(declared):,} bytes")
            return
        read = 0
        over = started = False

        async def counted() -> Message:
            nonlocal read, over
            if over:
                raise _BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    over = True
                    raise _BodyTooLarge()
            return message

        async def unless_over(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to the exception above: the 413 replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except _BodyTooLarge:
            pass
        if over and not started:
            await self._refuse(scope, receive, send, f"has more than {self.max_bytes:,} bytes")

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        detail = f"the request body {size}; at most {self.max_bytes:,} are read{self.hint}"
        response = JSONResponse(
            self.error_body(BodyTooLargeError.code, detail),
            status_code=BodyTooLargeError.status,
            headers={"Connection": "close"},  # the rest of the body is never read
        )
        await response(scope, receive, send)


class InternalErrors:
    """Answers an unhandled exception with a generic 500 and logs it under a request id."""

    def __init__(self, app: ASGIApp, error_body: ErrorBody = lorakit_error) -> None:
        self.app = app
        self.error_body = error_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            request_id = uuid.uuid4().hex
            log.exception(
                "internal error, request id %s (%s %s)", request_id, scope["method"], scope["path"]
            )
            if started:  # half an answer is out: the server can only close the connection
                raise
            detail = f"the server failed on this request; its log has request id {request_id}"
            response = JSONResponse(
                self.error_body("internal_error", detail),
                status_code=500,
                headers={"X-Request-ID": request_id},
            )
            await response(scope, receive, send)
