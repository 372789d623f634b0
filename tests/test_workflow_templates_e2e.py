"""ComfyUI's published Wan2.1 t2v, i2v and flf2v workflows, in UI and API format, end to end through
`kinema run` and through a real `kinema serve`: on the built-in model and on tiny random checkpoints
under ComfyUI's file names. Changed only as `--set NODE.INPUT=VALUE` would: model names, a small size,
few steps. Output files decoded back (frames, size)."""

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import kinema.media
from kinema.cli.main import main
from test_server import Server
from test_workflow_comfy import CLIP_NAME, DIT_NAMES, IMAGES, T5_NAME, TEMPLATES, VAE_NAME, _image_file, write_comfy_models

NAMES = ["text_to_video_wan.json", "image_to_video_wan.json", "wan2.1_flf2v_720_f16.json"]
BUILTIN = {"UNETLoader.unet_name": "kinema_builtin_dit.safetensors", "CLIPLoader.clip_name": "kinema_builtin_umt5.safetensors",
           "VAELoader.vae_name": "kinema_builtin_vae.safetensors", "CLIPVisionLoader.clip_name": "kinema_builtin_clip_vision.safetensors"}


def _sets(name: str, models: dict, w: int, h: int) -> dict:
    """{node id.input: value} for a template: `models` by class type, the size on the latent / i2v node."""
    workflow = json.loads((TEMPLATES / name).read_text())
    ids = {n["type"]: str(n["id"]) for n in workflow["nodes"]}
    size = ids.get("WanImageToVideo") or ids.get("WanFirstLastFrameToVideo") or ids["EmptyHunyuanLatentVideo"]
    out = {f"{size}.width": w, f"{size}.height": h, f"{size}.length": 5, f"{ids['KSampler']}.steps": 2}
    for key, value in models.items():
        cls, inp = key.split(".")
        if cls in ids:
            out[f"{ids[cls]}.{inp}"] = value
    return out


def _api(name: str, sets: dict) -> dict:
    from kinema.workflow.convert import to_api

    prompt = to_api(json.loads((TEMPLATES / name).read_text()))
    for key, value in sets.items():
        nid, inp = key.split(".", 1)
        assert inp in prompt[nid]["inputs"]
        prompt[nid]["inputs"][inp] = value
    return prompt


def _inputs(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(IMAGES.get(name, [])):
        _image_file(folder / img, 80, 64, i)


def _shape(path: Path):
    return tuple(kinema.media.read_video(path).frames.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_models")
    write_comfy_models(root)
    return root, {**DIT_NAMES, "t5": T5_NAME, "vae": VAE_NAME, "clip": CLIP_NAME}


def _tiny_models(names: dict, name: str) -> dict:
    kind = "flf2v" if "flf2v" in name else "i2v" if "image_to_video" in name else "t2v"
    return {"UNETLoader.unet_name": names[kind], "CLIPLoader.clip_name": names["t5"], "VAELoader.vae_name": names["vae"],
            "CLIPVisionLoader.clip_name": names["clip"]}


@pytest.mark.parametrize("name", NAMES)
def test_kinema_run_ui_and_api_formats(tmp_path, tiny, name):
    root, names = tiny
    _inputs(tmp_path / "input", name)
    for label, models, extra in (("builtin", BUILTIN, []), ("tiny", _tiny_models(names, name), ["--models", str(root)])):
        sets = _sets(name, models, 64, 48)
        api_file = tmp_path / f"{label}_api.json"
        api_file.write_text(json.dumps(_api(name, sets)))
        for fmt, workflow, overrides in (("ui", TEMPLATES / name, sets), ("api", api_file, {})):
            out = tmp_path / f"out_{label}_{fmt}"
            args = ["run", str(workflow), "--output", str(out), "--input", str(tmp_path / "input"), *extra]
            for key, value in overrides.items():
                args += ["--set", f"{key}={json.dumps(value)}"]
            assert main(args) == 0, (label, fmt)
            (video,) = list(out.rglob("*.mp4"))
            assert _shape(video) == (5, 48, 64, 3), (label, fmt)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny):
    root, _ = tiny
    base = tmp_path_factory.mktemp("server")
    for name in NAMES:
        _inputs(base / "input", name)
    srv = Server(base, "--models", str(root)).wait_ready()  # `kinema serve` in a subprocess, on a free port
    yield srv.url, base
    srv.stop()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))


def _wait(url: str, prompt_id: str) -> dict:
    for _ in range(1200):
        history = json.load(urllib.request.urlopen(f"{url}/history/{prompt_id}"))
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} did not finish")


@pytest.mark.parametrize("name", NAMES)
def test_through_the_server_ui_and_api_formats(server, tiny, name):
    url, base = server
    _, names = tiny
    for label, models in (("builtin", BUILTIN), ("tiny", _tiny_models(names, name))):
        sets = _sets(name, models, 64, 48)
        ui = json.loads((TEMPLATES / name).read_text())
        ids = {str(n["id"]): n for n in ui["nodes"]}
        for key, value in sets.items():  # the UI-format workflow edited in place, as the editor would
            nid, inp = key.split(".", 1)
            ids[nid]["widgets_values"][_widget_index(ids[nid], inp)] = value
        for fmt, prompt in (("ui", ui), ("api", _api(name, sets))):
            answer = _post(f"{url}/prompt", {"prompt": prompt, "client_id": "t"})
            assert answer["node_errors"] == {}, answer
            record = _wait(url, answer["prompt_id"])
            assert record["status"]["status_str"] == "success", record["status"]
            (saved,) = [o for o in record["outputs"].values() if "images" in o]
            item = saved["images"][0]
            query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
            data = urllib.request.urlopen(f"{url}/view?{query}").read()
            path = base / "output" / item["subfolder"] / item["filename"]
            assert data == path.read_bytes() and _shape(path) == (5, 48, 64, 3), (label, fmt)


def _widget_index(node: dict, inp: str) -> int:
    """Where `inp` sits in a UI node's widgets_values (the seed's control value counted)."""
    from kinema.workflow.types import NODES

    definition = NODES[node["type"]]
    i = 0
    for name, spec in definition.inputs.items():
        if not spec.is_widget:
            continue
        if name == inp:
            return i
        i += 1
        if spec.control_after_generate or (spec.type == "INT" and name in ("seed", "noise_seed")):
            i += 1
    raise AssertionError(f"{node['type']} has no widget {inp}")
