"""The few routes ComfyUI's own frontend (the comfyui-frontend-package wheel, `kinema serve --comfy-frontend`)
calls beyond the API: one user's settings and files (workflows it saves), and empty answers for what Kinema
has none of (translations, templates of custom nodes, model previews, subgraphs). One user, kept in
OUTPUT/.kinema/user/default/ (ComfyUI's user/default), which /view never serves (a hidden folder).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from kinema.server.security import PathRefused, confined


def frontend_router(user_root: Path, max_upload: int) -> APIRouter:
    api = APIRouter()
    for folder in ("workflows", "subgraphs"):  # listed at start-up; ComfyUI answers 404 for a missing one
        (user_root / folder).mkdir(parents=True, exist_ok=True)
    settings_file = user_root / "comfy.settings.json"
    lock = threading.Lock()

    def read_settings() -> dict:
        try:
            return json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def write_settings(settings: dict) -> None:
        tmp = settings_file.with_name(f".{settings_file.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps(settings, indent=2), encoding="utf-8")
        os.replace(tmp, settings_file)

    async def body_json(request: Request):
        try:
            return json.loads(await request.body())
        except ValueError:
            raise HTTPException(400, "the request body is not JSON") from None

    @api.get("/users")
    def users():
        return {"storage": "server", "migrated": True}

    @api.get("/settings")
    def get_settings():
        return read_settings()

    @api.get("/settings/{key}")
    def get_setting(key: str):
        return read_settings().get(key)

    @api.post("/settings")
    async def post_settings(request: Request):
        data = await body_json(request)
        if not isinstance(data, dict):
            raise HTTPException(400, "settings must be a JSON object")
        with lock:
            write_settings({**read_settings(), **data})
        return Response(status_code=200)

    @api.post("/settings/{key}")
    async def post_setting(key: str, request: Request):
        value = await body_json(request)
        with lock:
            write_settings({**read_settings(), key: value})
        return Response(status_code=200)

    def user_path(name: str) -> Path:
        parts = [p for p in name.replace("\\", "/").split("/") if p]
        if name.startswith(("/", "\\")):
            raise HTTPException(400, f"{name!r} is an absolute path; give a name inside the user folder")
        if not parts:
            raise HTTPException(400, "no file name given")
        try:
            return confined(user_root, "/".join(parts[:-1]), parts[-1])
        except PathRefused as e:
            raise HTTPException(e.status, str(e)) from None

    @api.get("/userdata")
    def list_userdata(dir: str = "", recurse: str = "", full_info: str = "", split: str = ""):
        folder = user_path(dir) if dir else user_root
        if not folder.is_dir():
            return JSONResponse({"error": {"type": "not_found", "message": f"{dir} is not a folder"}}, status_code=404)
        files = folder.rglob("*") if recurse.lower() == "true" else folder.iterdir()
        names = sorted(p.relative_to(folder).as_posix() for p in files if p.is_file() and not p.name.startswith("."))
        if full_info.lower() == "true":
            return [{"path": n, "size": (folder / n).stat().st_size, "modified": (folder / n).stat().st_mtime}
                    for n in names]
        return [n.split("/") for n in names] if split.lower() == "true" else names

    @api.get("/userdata/{name:path}")
    def get_userdata(name: str):
        path = user_path(name)
        if not path.is_file():
            raise HTTPException(404, f"{name} is not saved")
        return FileResponse(path)

    @api.post("/userdata/{name:path}")
    async def post_userdata(name: str, request: Request, overwrite: str = "true", full_info: str = ""):
        path = user_path(name)
        if path.exists() and overwrite.lower() == "false":
            raise HTTPException(409, f"{name} exists")
        data = await request.body()
        if len(data) > max_upload:
            raise HTTPException(413, "the file is over the upload limit")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        rel = path.relative_to(user_root.resolve()).as_posix()
        if full_info.lower() == "true":
            st = path.stat()
            return {"path": rel, "size": st.st_size, "modified": st.st_mtime}
        return rel

    @api.delete("/userdata/{name:path}")
    def delete_userdata(name: str):
        path = user_path(name)
        if not path.is_file():
            raise HTTPException(404, f"{name} is not saved")
        path.unlink()
        return Response(status_code=204)

    @api.get("/features")
    def features():
        return {"supports_preview_metadata": False, "max_upload_size": max_upload}

    for route, value in (("/i18n", {}), ("/workflow_templates", {}), ("/node_replacements", {}),
                         ("/global_subgraphs", {}), ("/experiment/models", []), ("/experiment/models/{folder}", []),
                         ("/extensions/core/list", [])):
        api.add_api_route(route, (lambda v: lambda: v)(value), methods=["GET"])
    for route in ("/templates/index.json", "/templates/index_logo.json"):  # the workflow-templates package's; none here
        api.add_api_route(route, lambda: [], methods=["GET"])
    return api
