"""What `zoo serve` lets in: who may ask (a token once the server is reachable from other machines) and
what an upload may be (a bounded body that decodes as an image, nothing else)."""

from __future__ import annotations

import hmac
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from modelzoo.registry.errors import BadInput
from modelzoo.search.engine import read_image

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
TOKEN_COOKIE = "zoo_token"
MAX_FORM_FILES = 8
MAX_FORM_FIELDS = 64

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def check_bind(host: str, token: str | None) -> None:
    """Anyone who can reach a non-local address can read the whole registry, so that needs a token."""
    if host not in LOCAL_HOSTS and not token:
        raise BadInput(f"--host {host} lets other machines in: give --token T (or set ZOO_SERVE_TOKEN)")


class TokenGate:
    """Every request carries the token as `Authorization: Bearer T` or in the cookie `/login?token=T`
    sets; anything else is 401. Without a token the gate is open (a local bind)."""

    def __init__(self, app: Asgi, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or self._carries_token(Request(scope), self.token):
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"error": "missing or wrong token: send `Authorization: Bearer T` or open "
                                          "/login?token=T first"}, 401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    @staticmethod
    def _carries_token(request: Request, token: str) -> bool:
        if request.url.path == "/login":
            return True  # the login route checks the token it is given
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        offered = bearer if scheme.lower() == "bearer" else request.cookies.get(TOKEN_COOKIE, "")
        return token_matches(offered, token)


def token_matches(offered: str, token: str) -> bool:
    return hmac.compare_digest(offered.encode(), token.encode())


async def bounded_form(request: Request, limit: int) -> FormData:
    """The request's form, parsed only after its whole body has arrived within `limit` bytes: a client
    cannot make the server spool more than that to disk, whatever Content-Length it claims."""
    too_large = BadInput(f"the upload is larger than this server's limit of {limit / 2**20:g} MB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large

    async def replay() -> Message:
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    return await Request(request.scope, replay).form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)


def decode_image(upload: UploadFile, data: bytes, field: str) -> np.ndarray:
    """An uploaded file as an RGB array, decoded by the same code (and refused with the same messages) as
    `zoo search --image FILE`, naming the upload instead of a temporary file."""
    with tempfile.NamedTemporaryFile(prefix="zoo-upload-") as spool:
        spool.write(data)
        spool.flush()
        try:
            return read_image(spool.name)
        except BadInput as e:
            raise BadInput(str(e).replace(spool.name, f"{field} upload {upload.filename or ''!r}")) from None
