"""Workflow outputs carry ComfyUI's own metadata keys, so ComfyUI's editor loads them by drag and drop:
PNG text chunks "prompt" / "workflow", mp4 / webm container tags of the same names, and an animated WebP's
EXIF Model / Make strings "prompt:..." / "workflow:..."; Kinema's own record is still read back."""

import json

import av
import numpy as np
from PIL import Image

from kinema.media import read_metadata, save_video

PROMPT = {"1": {"class_type": "KSampler", "inputs": {"seed": 5}}}
WORKFLOW = {"nodes": [{"id": 1, "type": "KSampler"}], "links": []}
META = {"prompt": PROMPT, "workflow": WORKFLOW}


def _clip(frames=3):
    return np.random.default_rng(0).integers(0, 255, (frames, 16, 16, 3), dtype=np.uint8)


def test_png_text_chunks(tmp_path):
    path = save_video(_clip(1), tmp_path, format="png", metadata=META)
    with Image.open(path) as im:
        assert json.loads(im.text["prompt"]) == PROMPT and json.loads(im.text["workflow"]) == WORKFLOW
    assert read_metadata(path) == META


def test_video_container_tags(tmp_path):
    for fmt in ("h264-mp4", "webm"):
        path = save_video(_clip(), tmp_path, format=fmt, metadata=META)
        with av.open(str(path)) as c:
            tags = {k.lower(): v for k, v in c.metadata.items()}
        assert json.loads(tags["prompt"]) == PROMPT and json.loads(tags["workflow"]) == WORKFLOW, fmt
        assert read_metadata(path) == META


def test_webp_exif_strings(tmp_path):
    path = save_video(_clip(), tmp_path, format="webp", metadata=META)
    with Image.open(path) as im:
        exif = im.getexif()
    assert exif[0x0110] == "prompt:" + json.dumps(PROMPT) and exif[0x010F] == "workflow:" + json.dumps(WORKFLOW)
    assert read_metadata(path) == META


def test_no_comfy_keys_without_a_workflow(tmp_path):
    path = save_video(_clip(1), tmp_path, format="png", metadata={"task": "t2v"})
    with Image.open(path) as im:
        assert "prompt" not in im.text and "workflow" not in im.text
