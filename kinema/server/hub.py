"""The websocket clients, and messages to them from any thread.

Each client gets its own outgoing queue and sender task, so messages reach a client in the order they
were sent and a slow or dead client holds up no one else. The worker thread calls `send` / `send_bytes`;
they hop onto the event loop with `call_soon_threadsafe`, which keeps their order.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct

log = logging.getLogger("kinema")

PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE
IMAGE_TYPES = {"JPEG": 1, "PNG": 2}
MAX_PENDING = 1000  # messages waiting for one client before it is dropped (previews are dropped first)
PREVIEW_SIZE = 512  # ComfyUI's default --preview-size


class Client:
    def __init__(self, sid: str, ws):
        self.sid, self.ws = sid, ws
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def pump(self) -> None:
        try:
            while True:
                msg = await self.queue.get()
                if isinstance(msg, (bytes, bytearray)):
                    await self.ws.send_bytes(bytes(msg))
                else:
                    await self.ws.send_text(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away
            log.debug("websocket %s: send failed: %s", self.sid, exc)


class Hub:
    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: dict[str, Client] = {}

    # -- on the event loop -------------------------------------------------------------------------
    def attach(self, ws, sid: str) -> Client:
        self.loop = asyncio.get_running_loop()
        old = self.clients.pop(sid, None)
        if old and old.task:
            old.task.cancel()
        client = Client(sid, ws)
        client.task = asyncio.create_task(client.pump())
        self.clients[sid] = client
        return client

    def detach(self, client: Client) -> None:
        if self.clients.get(client.sid) is client:
            del self.clients[client.sid]
        if client.task:
            client.task.cancel()

    def _dispatch(self, msg, sid: str | None) -> None:
        targets = list(self.clients.values()) if sid is None else [c for c in (self.clients.get(sid),) if c]
        for client in targets:
            if client.queue.qsize() >= MAX_PENDING:
                if isinstance(msg, (bytes, bytearray)):
                    continue
                log.warning("websocket %s: %d messages unread, dropping the client", client.sid, MAX_PENDING)
                self.detach(client)
                continue
            client.queue.put_nowait(msg)

    # -- from any thread ---------------------------------------------------------------------------
    def _post(self, msg, sid: str | None) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._dispatch, msg, sid)
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass

    def send(self, event: str, data: dict, sid: str | None = None) -> None:
        """One JSON message {"type", "data"}: to client `sid`, or to everyone when sid is None."""
        self._post(json.dumps({"type": event, "data": data}, default=str), sid)

    def send_preview(self, image, sid: str | None = None, fmt: str = "JPEG") -> None:
        """A binary preview frame as ComfyUI sends one: >I event type, >I image type, then the image file."""
        try:
            payload = encode_preview(image, fmt)
        except Exception as exc:  # a preview must never stop a job
            log.warning("preview not sent: %s", exc)
            return
        self._post(payload, sid)


def encode_preview(image, fmt: str = "JPEG") -> bytes:
    from PIL import Image, ImageOps
    import numpy as np

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
        image = Image.fromarray(arr)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    if max(image.size) > PREVIEW_SIZE:
        image = ImageOps.contain(image, (PREVIEW_SIZE, PREVIEW_SIZE), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    buf.write(struct.pack(">I", PREVIEW_IMAGE))
    buf.write(struct.pack(">I", IMAGE_TYPES[fmt]))
    image.save(buf, format=fmt, quality=95, compress_level=1)
    return buf.getvalue()
