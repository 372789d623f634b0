"""What keeps the server safe to run: the token check, the body-size limit, same-origin requests,
paths confined to their folders, and uploads recognised by their first bytes.

The token may come as `Authorization: Bearer T`, as basic auth with T as the password (any user
name: a browser asks for it), as `?token=T` (a browser's first visit, a websocket); a request
authorised by `?token=` gets an HttpOnly, SameSite=Strict cookie, so the page's own later
requests and its websocket carry it without knowing it.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import os
import socket
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from starlette.exceptions import HTTPException

COOKIE = "kinema_token"


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _reply(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"type": "unauthorized" if status == 401 else "refused", "message": message,
                                 "details": "", "extra_info": {}}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: the token (when set) and the same-origin check, on every route and the websocket."""

    def __init__(self, app, token: str | None = None):
        self.app, self.token = app, token

    def _authorised(self, scope, headers) -> tuple[bool, bool]:
        """(authorised, by the query string)"""
        token = self.token
        if not token:
            return True, False
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return True, False
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except Exception:
                password = ""
            if hmac.compare_digest(password.encode(), token.encode()):
                return True, False
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:
            pass
        if COOKIE in cookie and hmac.compare_digest(cookie[COOKIE].value.encode(), token.encode()):
            return True, False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        for given in query.get("token", []):
            if hmac.compare_digest(given.encode(), token.encode()):
                return True, True
        return False, False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if not same_origin(headers):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _reply(send, 403, "a request from another site (its Origin is not this server's host) is refused")
        ok, by_query = self._authorised(scope, headers)
        if not ok:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _reply(send, 401, "this server needs its token: send 'Authorization: Bearer TOKEN', basic auth "
                                "with the token as password, or ?token=TOKEN",
                                [(b"www-authenticate", b'Basic realm="kinema", charset="UTF-8"')])
        if not by_query or scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)


def same_origin(headers: dict[str, str]) -> bool:
    """ComfyUI's origin check: a browser request whose Origin names another host than the one it was sent
    to is a page elsewhere driving this server (no Origin: not a browser, or same-origin navigation)."""
    origin, host = headers.get("origin"), headers.get("host")
    if not origin or not host or origin == "null":
        return origin != "null"
    return urlsplit(origin).netloc.lower() == host.lower()


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the server's limit of {limit >> 20} MiB")


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes (`upload_limit` on upload routes), by their
    Content-Length up front, or while they stream in."""

    def __init__(self, app, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        limit = self.upload_limit + (1 << 20) if path.rstrip("/").endswith(("/upload/image", "/upload/video")) else self.limit
        length = _headers(scope).get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(send, 400, f"Content-Length {length!r} is not a number")
            if int(length) > limit:
                return await _reply(send, 413, f"the request body ({int(length) >> 20} MiB) is over the server's limit "
                                    f"of {limit >> 20} MiB")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return await self.app(scope, counted, send)


# -- paths ---------------------------------------------------------------------------------------------
class PathRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _parts(value: str, what: str) -> list[str]:
    if "\x00" in value:
        raise PathRefused(400, f"{what} holds a NUL byte")
    if value.startswith(("/", "\\")) or (len(value) > 1 and value[1] == ":") or os.path.isabs(value):
        raise PathRefused(400, f"{what} {value!r} is an absolute path; give a name inside the folder")
    parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
    for p in parts:
        if p == "..":
            raise PathRefused(400, f"{what} {value!r} climbs out of its folder ('..')")
        if p.startswith("."):
            raise PathRefused(400, f"{what} {value!r} names a hidden file or folder")
    return parts


def confined(base: Path, subfolder: str, filename: str | None = None) -> Path:
    """base/subfolder/filename, refused unless it stays inside `base` once every symlink is resolved."""
    parts = _parts(subfolder or "", "subfolder")
    if filename is not None:
        if not filename:
            raise PathRefused(400, "filename is empty")
        name = _parts(filename, "filename")
        if len(name) != 1:
            raise PathRefused(400, f"filename {filename!r} is not a plain file name; put folders in subfolder")
        parts += name
    root = base.resolve()
    target = root.joinpath(*parts).resolve()
    if target != root and root not in target.parents:
        raise PathRefused(403, f"{'/'.join(parts)!r} leads outside its folder (a symlink?)")
    return target


# -- uploads ----------------------------------------------------------------------------------------
IMAGE_EXTS = {"png": ".png", "jpeg": ".jpg .jpeg", "webp": ".webp", "gif": ".gif"}
VIDEO_EXTS = {"mp4": ".mp4 .m4v .mov", "webm": ".webm .mkv"}


def sniff(head: bytes) -> str | None:
    """The file type its first bytes say: png, jpeg, webp, gif, mp4 (any ISO-BMFF: mp4 / mov) or webm; else None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    return None


def check_upload(filename: str, head: bytes, videos: bool = True) -> str:
    """The upload's kind; a PathRefused(415 / 400) unless its bytes are an image (or video) its extension agrees with."""
    kind = sniff(head)
    allowed = {**IMAGE_EXTS, **(VIDEO_EXTS if videos else {})}
    if kind not in allowed:
        raise PathRefused(415, f"{filename!r} is not a PNG, JPEG, WebP or GIF image"
                          f"{' or an MP4 / WebM video' if videos else ''} (judged by its first bytes)")
    ext = os.path.splitext(filename)[1].lower()
    if ext not in allowed[kind].split():
        raise PathRefused(400, f"{filename!r} holds {kind} data but is named {ext or 'without an extension'}; "
                          f"name it {allowed[kind].split()[0]}")
    return kind
