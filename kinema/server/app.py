"""ComfyUI's HTTP and websocket API over Kinema's workflow executor, as a FastAPI app.

Same routes, bodies and message types as ComfyUI's server.py (each also under /api/), so ComfyUI API
clients and scripts work unchanged. Validation runs when a prompt is posted (a bad prompt is a 400
with ComfyUI's `error` + `node_errors`); the worker thread (worker.py) runs the queue (queue.py).
"""

from __future__ import annotations

import json
import logging
import math
import mimetypes
import os
import platform
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from kinema.server.hub import Hub
from kinema.server.queue import JobQueue
from kinema.server.security import BodyLimit, Guard, PathRefused, check_upload, confined
from kinema.server.worker import Worker

log = logging.getLogger("kinema")

WEB = Path(__file__).parent / "web"
MAX_DEPTH = 64  # JSON nesting of a POST /prompt body (a UI workflow in extra_data is ~12 deep)
MAX_NODES = 2000  # nodes in one prompt, when validation sets none of its own
FOLDER_TYPES = ("output", "input", "temp")
# Types a browser would run as a page or script if served as themselves from /view.
UNSAFE_TYPES = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "application/javascript",
                "text/css", "image/svg+xml", "application/xml", "text/xml"}
for _ext, _type in ((".webp", "image/webp"), (".webm", "video/webm"), (".mp4", "video/mp4"), (".mkv", "video/x-matroska"),
                    (".mov", "video/quicktime"), (".gif", "image/gif"), (".json", "application/json"),
                    (".safetensors", "application/octet-stream")):
    mimetypes.add_type(_type, _ext)


@dataclass
class ServerConfig:
    output_dir: Path
    input_dir: Path
    temp_dir: Path | None = None
    models_dir: Path | None = None
    extra_model_paths: Path | None = None
    token: str | None = None
    max_body_mb: float = 16
    max_upload_mb: float = 100
    memory_budget_gb: float | None = None
    web_root: Path | None = None  # None: the package's page (kinema/server/web)
    comfy_frontend: bool = False  # web_root is ComfyUI's frontend: add the routes it calls (comfy_frontend.py)
    max_nodes: int = MAX_NODES
    cluster: object = None  # kinema.server.cluster.ClusterOptions (connected): jobs run on Ray workers

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        self.input_dir = Path(self.input_dir)
        self.temp_dir = Path(self.temp_dir) if self.temp_dir else self.output_dir / ".kinema" / "temp"


class PromptRefused(Exception):
    def __init__(self, error: dict, node_errors: dict | None = None, status: int = 400):
        super().__init__(error.get("message"))
        self.error, self.node_errors, self.status = error, node_errors or {}, status


def _error(kind: str, message: str, details: str = "", **extra) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def json_depth(value, limit: int) -> int:
    """Nesting depth of a parsed JSON value, walked without recursion; stops counting past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


class Engine:
    """The real executor and validation, built from the model folders (kept apart so tests can pass their own)."""

    def __init__(self, config: ServerConfig):
        from kinema.workflow.context import ModelCache
        from kinema.workflow.executor import Executor
        from kinema.workflow.folders import ModelFolders
        import kinema.workflow.nodes  # noqa: F401  (registers the nodes)

        self.folders = ModelFolders(config.models_dir, config.extra_model_paths)
        budget = None if config.memory_budget_gb is None else int(config.memory_budget_gb * (1 << 30))
        self.executor = Executor(self.folders, config.output_dir, input_dir=config.input_dir, temp_dir=config.temp_dir,
                                 models=ModelCache(budget))
        self.config = config

    def context(self):
        from kinema.workflow.context import ExecutionContext

        ctx = getattr(self.executor, "context", None)
        if callable(ctx):
            return ctx()
        return ExecutionContext(self.folders, self.config.output_dir, self.config.input_dir, self.config.temp_dir,
                                models=self.executor.models)

    def validate(self, prompt: dict) -> list:
        from kinema.workflow.validate import PromptError, validate_prompt

        try:
            return validate_prompt(prompt, self.context())  # a list of output ids, .node_errors: outputs left out
        except PromptError as e:
            raise PromptRefused(e.error, e.node_errors) from None

    def to_api(self, workflow: dict) -> dict:
        from kinema.workflow.convert import to_api

        return to_api(workflow)


def create_app(config: ServerConfig, engine=None) -> FastAPI:
    """The app; `engine` (an Engine, or any object with .executor, .validate(prompt), .to_api(workflow),
    .folders) defaults to the real one."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    config.input_dir.mkdir(parents=True, exist_ok=True)
    config.temp_dir.mkdir(parents=True, exist_ok=True)
    for stale in config.temp_dir.iterdir():  # ComfyUI empties its temp folder at start-up
        if stale.is_file():
            stale.unlink(missing_ok=True)
    engine = engine or Engine(config)
    queue = JobQueue(config.output_dir / ".kinema" / "queue.sqlite")
    for pid in queue.recovered:
        log.warning("job %s was running when the server stopped: queued again, first", pid)
    for pid in queue.failed:
        log.warning("job %s stopped the server %d times: recorded as failed, not run again", pid, 2)
    hub = Hub()
    folders = {"output": config.output_dir, "input": config.input_dir, "temp": config.temp_dir}
    if config.cluster is not None:
        from kinema.server.cluster import RayDispatcher, settings_of

        worker = RayDispatcher(queue, hub, config.cluster, settings_of(config), folders)
    else:
        worker = Worker(queue, engine.executor, hub)
    web_root = config.web_root or WEB

    @asynccontextmanager
    async def lifespan(app):
        import asyncio

        hub.loop = asyncio.get_running_loop()
        worker.start()
        yield
        await run_in_threadpool(worker.stop)
        queue.close()

    app = FastAPI(title="Kinema", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue, app.state.worker, app.state.hub, app.state.engine = queue, worker, hub, engine
    api = APIRouter()

    # -- prompts and the queue -------------------------------------------------------------------------
    @api.post("/prompt")
    async def post_prompt(request: Request):
        try:
            body = await request.body()
            try:
                data = json.loads(body)
            except (ValueError, RecursionError) as e:
                raise PromptRefused(_error("invalid_prompt", "The request body is not JSON.", str(e)[:200]))
            if not isinstance(data, dict):
                raise PromptRefused(_error("invalid_prompt", "The request body must be a JSON object with a 'prompt'."))
            if json_depth(data, MAX_DEPTH) > MAX_DEPTH:
                raise PromptRefused(_error("invalid_prompt", f"The request is nested deeper than {MAX_DEPTH} levels."))
            if "prompt" not in data:
                raise PromptRefused(_error("no_prompt", "No prompt provided", "The body needs a 'prompt' object."))
            try:
                response = await run_in_threadpool(_queue_prompt, data)
            except PromptRefused:
                raise
            except Exception as e:  # a shape nothing above foresaw: still the prompt's fault, still a 400
                log.exception("prompt refused by an unexpected error")
                raise PromptRefused(_error("invalid_prompt", f"The prompt could not be read: {e}",
                                           f"internal: {type(e).__name__}")) from None
        except PromptRefused as e:
            log.warning("invalid prompt: %s", e.error.get("message"))
            return JSONResponse({"error": e.error, "node_errors": e.node_errors}, status_code=e.status)
        worker.queue_changed()
        return response

    def _queue_prompt(data: dict) -> dict:
        prompt = data["prompt"]
        if not isinstance(prompt, dict) or not prompt:
            raise PromptRefused(_error("invalid_prompt", "'prompt' must be a non-empty object of nodes: "
                                       "{id: {class_type, inputs}} (the API format) or a UI workflow."))
        extra_data = data.get("extra_data", {})
        if not isinstance(extra_data, dict):
            raise PromptRefused(_error("invalid_prompt", "'extra_data' must be an object."))
        client_id = data.get("client_id")
        if client_id is not None and not isinstance(client_id, str):
            raise PromptRefused(_error("invalid_prompt", "'client_id' must be a string."))
        if "nodes" in prompt and "links" in prompt:  # a UI-format workflow: converted as the frontend does
            if isinstance(extra_data.get("extra_pnginfo", {}), dict):
                extra_data.setdefault("extra_pnginfo", {}).setdefault("workflow", prompt)
            prompt = _guarded(lambda: engine.to_api(prompt), "converted")
        limit = getattr(_validate_module(), "MAX_NODES", None) or config.max_nodes
        if len(prompt) > limit:
            raise PromptRefused(_error("invalid_prompt", f"The prompt has {len(prompt)} nodes; this server takes at "
                                       f"most {limit}."))
        outputs = _guarded(lambda: engine.validate(prompt), "validated")
        if "number" in data:
            number = data["number"]
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                    or abs(number) > 2**53:
                raise PromptRefused(_error("invalid_prompt", f"'number' must be a finite number, got {number!r}."))
        else:
            number = queue.next_number()
            if data.get("front"):
                number = -number
        prompt_id = data.get("prompt_id") or str(uuid.uuid4())
        if not isinstance(prompt_id, str) or len(prompt_id) > 200 or queue.known(prompt_id):
            raise PromptRefused(_error("invalid_prompt", f"'prompt_id' {prompt_id!r} is not a new id: leave it out "
                                       "and the server picks one."))
        if client_id is not None:
            extra_data["client_id"] = client_id
        extra_data.setdefault("create_time", int(time.time() * 1000))  # as ComfyUI: the jobs view sorts by it
        node_errors = getattr(outputs, "node_errors", None) or {}
        outputs = list(outputs)
        try:
            queue.put(prompt_id, number, prompt, extra_data, outputs)
        except ValueError as e:  # NaN / infinity somewhere in the prompt: not JSON
            raise PromptRefused(_error("invalid_prompt", f"The prompt holds a value JSON cannot store: {e}."))
        return {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def _guarded(fn, what: str):
        """Validation's own refusals pass through; anything else it raises is still the prompt's 400, logged."""
        try:
            return fn()
        except PromptRefused:
            raise
        except RecursionError:
            raise PromptRefused(_error("invalid_prompt", "The prompt is nested too deeply.")) from None
        except Exception as e:
            from kinema.errors import KinemaError

            if not isinstance(e, KinemaError):
                log.exception("prompt could not be %s", what)
            raise PromptRefused(_error("invalid_prompt", f"The prompt could not be {what}: {e}",
                                       f"internal: {type(e).__name__}" if not isinstance(e, KinemaError) else "")) from None

    @api.get("/prompt")
    def get_prompt():
        return worker.status()

    @api.get("/queue")
    def get_queue():
        running, pending = queue.current()
        return {"queue_running": running, "queue_pending": pending}

    @api.post("/queue")
    async def post_queue(request: Request):
        data = await _json_object(request)
        if data.get("clear"):
            queue.clear_pending()
        if "delete" in data:
            queue.delete_pending(_id_list(data["delete"]))
        worker.queue_changed()
        return Response(status_code=200)

    @api.post("/interrupt")
    async def post_interrupt(request: Request):
        data = await _json_object(request, allow_empty=True)
        prompt_id = data.get("prompt_id")
        worker.interrupt(prompt_id if isinstance(prompt_id, str) else None)
        return Response(status_code=200)

    @api.post("/free")
    async def post_free(request: Request):
        data = await _json_object(request, allow_empty=True)
        for flag in ("unload_models", "free_memory"):
            if data.get(flag):
                worker.set_flag(flag, True)
        return Response(status_code=200)

    # -- history -------------------------------------------------------------------------------------
    @api.get("/history")
    def get_history(max_items: str | None = None, offset: str | None = None):
        return queue.history(max_items=_int_param("max_items", max_items, 0),
                             offset=_int_param("offset", offset, -1) if offset is not None else -1)

    @api.get("/history/{prompt_id}")
    def get_history_item(prompt_id: str):
        return queue.history(prompt_id=prompt_id)

    @api.post("/history")
    async def post_history(request: Request):
        data = await _json_object(request)
        if data.get("clear"):
            await run_in_threadpool(queue.clear_history)
        if "delete" in data:
            await run_in_threadpool(queue.delete_history, _id_list(data["delete"]))
        return Response(status_code=200)

    @api.get("/jobs")
    def get_jobs(request: Request):
        from kinema.server.jobs import ALL_STATES, all_jobs

        q = request.query_params
        states = [s for s in q.get("status", "").split(",") if s] or list(ALL_STATES)
        if not set(states) <= set(ALL_STATES):
            raise HTTPException(400, f"status must be among {', '.join(ALL_STATES)}, got {q.get('status')!r}")
        offset = _int_param("offset", q.get("offset"), 0) or 0
        limit = _int_param("limit", q.get("limit"), 1)
        running, pending = queue.current()
        jobs = all_jobs(running, pending, queue.history(), states, q.get("workflow_id"), q.get("sort_by", "created_at"),
                        q.get("sort_order", "desc"))
        page = jobs[offset:] if limit is None else jobs[offset:offset + limit]
        return {"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": len(jobs),
                                             "has_more": offset + len(page) < len(jobs)}}

    @api.get("/jobs/{prompt_id}")
    def get_job(prompt_id: str):
        from kinema.server.jobs import history_job, queued_job

        entry = queue.history(prompt_id=prompt_id).get(prompt_id)
        if entry is not None:
            return history_job(prompt_id, entry, full=True)
        running, pending = queue.current()
        for items, state in ((running, "in_progress"), (pending, "pending")):
            for item in items:
                if item[1] == prompt_id:
                    return queued_job(item, state)
        raise HTTPException(404, f"no job {prompt_id}")

    # -- files ---------------------------------------------------------------------------------------
    @api.get("/view")
    def view(request: Request):
        q = request.query_params
        filename = q.get("filename")
        if not filename:
            raise HTTPException(400, "filename is required")
        kind = q.get("type") or "output"
        if filename.endswith("]") and " [" in filename:  # ComfyUI's annotated name: "x.png [output]"
            filename, _, kind = filename[:-1].rpartition(" [")
        if kind not in FOLDER_TYPES:
            raise HTTPException(400, f"type {kind!r} is not one of {', '.join(FOLDER_TYPES)}")
        path = confined(folders[kind], q.get("subfolder", ""), filename)
        if not path.is_file():
            raise HTTPException(404, f"{filename} is not in the {kind} folder")
        name = path.name.replace('"', "")
        if "preview" in q or q.get("channel") in ("rgb", "a"):
            return _image_variant(path, q)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type in UNSAFE_TYPES:
            content_type = "application/octet-stream"
        return FileResponse(path, media_type=content_type, headers={"Content-Disposition": f'filename="{name}"'})

    @api.post("/upload/image")
    async def upload_image(request: Request):
        try:
            form = await request.form(max_files=1, max_fields=16)
        except HTTPException:
            raise
        except Exception as e:
            raise HTTPException(400, f"the upload is not a readable multipart form: {e}")
        image = form.get("image")
        if image is None or isinstance(image, str) or not getattr(image, "filename", None):
            raise HTTPException(400, "the form needs a file field 'image' with a file name")
        kind = form.get("type") or "input"
        if kind not in FOLDER_TYPES:
            raise HTTPException(400, f"type {kind!r} is not one of {', '.join(FOLDER_TYPES)}")
        subfolder = str(form.get("subfolder") or "")
        overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
        limit = int(config.max_upload_mb * (1 << 20))
        if image.size is not None and image.size > limit:
            raise HTTPException(413, f"the upload is {image.size >> 20} MiB, over the limit of {limit >> 20} MiB "
                                "(kinema serve --max_upload_mb)")
        data = await image.read()
        if len(data) > limit:
            raise HTTPException(413, f"the upload is over the limit of {limit >> 20} MiB (kinema serve --max_upload_mb)")
        check_upload(image.filename, data[:16])
        name = await run_in_threadpool(_save_upload, folders[kind], subfolder, image.filename, data, overwrite)
        return {"name": name, "subfolder": subfolder, "type": kind}

    # -- what the server has ---------------------------------------------------------------------------
    @api.get("/object_info")
    def object_info():
        return _object_info(None)

    @api.get("/object_info/{node_class}")
    def object_info_one(node_class: str):
        return _object_info(node_class)

    def _object_info(only: str | None) -> dict:
        from kinema.workflow.types import NODES

        ctx = engine.context() if hasattr(engine, "context") else None
        out = {}
        for name, nd in NODES.items():
            if only is not None and name != only:
                continue
            try:
                out[name] = nd.object_info(ctx)
            except Exception:
                log.exception("object_info of %s failed", name)
        return out

    @api.get("/models")
    def list_model_kinds():
        from kinema.workflow.folders import KINDS

        return list(KINDS)

    @api.get("/models/{folder}")
    def list_models(folder: str):
        from kinema.errors import KinemaError

        try:
            return engine.folders.list(folder)
        except KinemaError as e:
            raise HTTPException(404, str(e))

    @api.get("/embeddings")
    def embeddings():
        return []

    @api.get("/extensions")
    def extensions():
        root = web_root.resolve()
        return sorted("/" + p.relative_to(root).as_posix() for p in (root / "extensions").rglob("*.js")) \
            if (root / "extensions").is_dir() else []

    @api.get("/system_stats")
    def system_stats():
        return _system_stats()

    @api.get("/kinema/workers")
    def workers():
        """What runs where: the in-process worker, or each Ray worker (its rank 0's pid and machine)."""
        if hasattr(worker, "workers"):
            return {"workers": worker.workers()}
        job = worker.current
        return {"workers": [{"index": 0, "ranks": 1, "pid": os.getpid(), "node": "server",
                             "prompt_id": job.prompt_id if job else None}]}

    # -- the websocket --------------------------------------------------------------------------------
    @api.websocket("/ws")
    async def websocket(ws: WebSocket):
        sid = ws.query_params.get("clientId") or uuid.uuid4().hex
        await ws.accept()
        client = hub.attach(ws, sid)
        try:
            hub.send("status", {"status": worker.status(), "sid": sid}, sid)
            job = worker.current
            if job is not None and job.extra_data.get("client_id") == sid and worker.last_node is not None:
                hub.send("executing", {"node": worker.last_node, "prompt_id": job.prompt_id}, sid)
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
        except WebSocketDisconnect:
            pass
        finally:
            hub.detach(client)

    if config.comfy_frontend:
        from kinema.server.comfy_frontend import frontend_router

        api.include_router(frontend_router(config.output_dir / ".kinema" / "user" / "default",
                                           int(config.max_upload_mb * (1 << 20))))
    app.include_router(api)
    app.include_router(api, prefix="/api")

    # -- errors as JSON ----------------------------------------------------------------------------------
    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                413: "too_large", 415: "unsupported_type"}.get(exc.status_code, "error")
        return JSONResponse({"error": _error(kind, str(exc.detail))}, status_code=exc.status_code)

    @app.exception_handler(PathRefused)
    async def path_refused(request, exc: PathRefused):
        return JSONResponse({"error": _error("path_refused" if exc.status != 415 else "unsupported_type", str(exc))},
                            status_code=exc.status)

    # -- the page --------------------------------------------------------------------------------------
    @app.get("/")
    def index():
        page = web_root / "index.html"
        if page.is_file():
            return FileResponse(page, headers={"Cache-Control": "no-cache"})
        return PlainTextResponse("Kinema server: the web page is not installed (kinema/server/web/index.html). "
                                 "The ComfyUI API is served here: POST /prompt, GET /history, /ws, ...")

    if web_root.is_dir():
        app.mount("/", StaticFiles(directory=web_root), name="web")
    app.add_middleware(BodyLimit, limit=int(config.max_body_mb * (1 << 20)),
                       upload_limit=int(config.max_upload_mb * (1 << 20)))
    app.add_middleware(Guard, token=config.token)
    return app


def _validate_module():
    try:
        import kinema.workflow.validate as v

        return v
    except ImportError:
        return None


async def _json_object(request: Request, allow_empty: bool = False) -> dict:
    body = await request.body()
    if not body.strip() and allow_empty:
        return {}
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise HTTPException(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "the request body must be a JSON object")
    return data


def _id_list(value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HTTPException(400, "'delete' must be a list of prompt ids")
    return value


def _int_param(name: str, value: str | None, minimum: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be a whole number, got {value!r}") from None
    if n < minimum:
        raise HTTPException(400, f"{name} must be at least {minimum}, got {n}")
    return n


def _save_upload(folder: Path, subfolder: str, filename: str, data: bytes, overwrite: bool) -> str:
    """Write an upload under a temporary name and publish it; an existing file with other bytes keeps its
    name and the upload becomes 'name (1).ext' (ComfyUI's rule), the same bytes are not written twice."""
    from kinema.media.naming import publish, remove, temp_path

    target = confined(folder, subfolder, filename)
    target.parent.mkdir(parents=True, exist_ok=True)
    confined(folder, subfolder, filename)  # again, now that the folders exist
    stem, ext = os.path.splitext(target.name)
    tmp = temp_path(target)
    try:
        tmp.write_bytes(data)
        i = 0
        while True:
            final = target if i == 0 else target.with_name(f"{stem} ({i}){ext}")
            if final.is_file() and not overwrite and final.read_bytes() == data:
                remove(tmp)
                return final.name
            try:
                publish(tmp, final, overwrite=overwrite)
                return final.name
            except FileExistsError:
                i += 1
    finally:
        remove(tmp)


def _image_variant(path: Path, q) -> Response:
    """ComfyUI's /view?preview=webp;90 and ?channel=rgb|a for images."""
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except Exception:
        raise HTTPException(400, f"{path.name} is not an image, so preview / channel do not apply") from None
    channel = q.get("channel", "rgba")
    if channel == "a":
        alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
        img = Image.new("RGBA", img.size)
        img.putalpha(alpha)
    elif channel == "rgb":
        img = img.convert("RGB")
    fmt, quality = "png", 90
    if "preview" in q:
        spec = q["preview"].split(";")
        fmt = spec[0] if spec[0] in ("webp", "jpeg") else "webp"
        if spec[-1].isdigit():
            quality = max(1, min(int(spec[-1]), 100))
        if fmt == "jpeg":
            img = img.convert("RGB")
    buf = BytesIO()
    img.save(buf, format=fmt, quality=quality)
    return Response(buf.getvalue(), media_type=f"image/{fmt}", headers={"Content-Disposition": f'filename="{path.name}"'})


def _system_stats() -> dict:
    import psutil
    import torch

    import kinema

    vm = psutil.virtual_memory()
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            reserved = torch.cuda.memory_reserved(i)
            devices.append({"name": f"cuda:{i} {torch.cuda.get_device_name(i)}", "type": "cuda", "index": i,
                            "vram_total": total, "vram_free": free, "torch_vram_total": reserved,
                            "torch_vram_free": reserved - torch.cuda.memory_allocated(i)})
    else:
        devices.append({"name": "cpu", "type": "cpu", "index": None, "vram_total": vm.total, "vram_free": vm.available,
                        "torch_vram_total": vm.total, "torch_vram_free": vm.available})
    return {"system": {"os": os.name, "ram_total": vm.total, "ram_free": vm.available,
                       "comfyui_version": f"kinema-{kinema.__version__}", "kinema_version": kinema.__version__,
                       "python_version": sys.version, "pytorch_version": torch.__version__,
                       "embedded_python": False, "argv": sys.argv, "platform": platform.platform(),
                       "started": int(_STARTED)},
            "devices": devices}


_STARTED = time.time()
