"""UI-format workflows -> API format, as ComfyUI's frontend converts them: ComfyUI's own published Wan2.1
templates checked value by value, and small graphs for each frontend-only construct (Reroute,
PrimitiveNode, notes, muted and bypassed nodes, SetNode / GetNode, VHS dict widgets, object links)."""

import json
from pathlib import Path

import pytest

import kinema.workflow.nodes  # noqa: F401  (the real nodes first; stand-ins only fill gaps)
from kinema.errors import KinemaError
from kinema.workflow.convert import to_api
from kinema.workflow.types import BOOLEAN, CHOICE, FLOAT, INT, LINK, NODES, STRING, node

templates = pytest.importorskip("comfyui_workflow_templates_json")
TEMPLATES = Path(templates.__file__).parent / "templates"

# ComfyUI's input lists for the nodes the templates use (registered only where the real node is absent).
_ANY_FILE = CHOICE(lambda ctx: [])
COMFY = {
    "UNETLoader": dict(required={"unet_name": _ANY_FILE, "weight_dtype": CHOICE(["default", "fp8_e4m3fn",
                                                                                    "fp8_e4m3fn_fast", "fp8_e5m2"])},
                       outputs=("MODEL",)),
    "CLIPLoader": dict(required={"clip_name": _ANY_FILE, "type": CHOICE(["stable_diffusion", "wan"])},
                       optional={"device": CHOICE(["default", "cpu"])}, outputs=("CLIP",)),
    "VAELoader": dict(required={"vae_name": _ANY_FILE}, outputs=("VAE",)),
    "CLIPVisionLoader": dict(required={"clip_name": _ANY_FILE}, outputs=("CLIP_VISION",)),
    "CLIPTextEncode": dict(required={"text": STRING(multiline=True), "clip": LINK("CLIP")}, outputs=("CONDITIONING",)),
    "CLIPVisionEncode": dict(required={"clip_vision": LINK("CLIP_VISION"), "image": LINK("IMAGE"),
                                       "crop": CHOICE(["center", "none"])}, outputs=("CLIP_VISION_OUTPUT",)),
    "LoadImage": dict(required={"image": CHOICE(lambda ctx: [], upload="image")}, outputs=("IMAGE", "MASK")),
    "EmptyHunyuanLatentVideo": dict(required={"width": INT(848, 16, 16384, 16), "height": INT(480, 16, 16384, 16),
                                              "length": INT(25, 1, 16384, 4), "batch_size": INT(1, 1, 4096)},
                                    outputs=("LATENT",)),
    "ModelSamplingSD3": dict(required={"model": LINK("MODEL"), "shift": FLOAT(3.0, 0.0, 100.0)}, outputs=("MODEL",)),
    "KSampler": dict(required={"model": LINK("MODEL"), "seed": INT(0, 0, 2**64 - 1, control_after_generate=True),
                               "steps": INT(20, 1, 10000), "cfg": FLOAT(8.0, 0.0, 100.0),
                               "sampler_name": CHOICE(["euler", "uni_pc"]), "scheduler": CHOICE(["simple", "normal"]),
                               "positive": LINK("CONDITIONING"), "negative": LINK("CONDITIONING"),
                               "latent_image": LINK("LATENT"), "denoise": FLOAT(1.0, 0.0, 1.0)}, outputs=("LATENT",)),
    "VAEDecode": dict(required={"samples": LINK("LATENT"), "vae": LINK("VAE")}, outputs=("IMAGE",)),
    "CreateVideo": dict(required={"images": LINK("IMAGE"), "fps": FLOAT(30.0, 1.0, 120.0)},
                        optional={"audio": LINK("AUDIO")}, outputs=("VIDEO",)),
    "SaveVideo": dict(required={"video": LINK("VIDEO"), "filename_prefix": STRING("video/ComfyUI"),
                                "format": CHOICE(["auto", "mp4"]), "codec": CHOICE(["auto", "h264"])},
                      output_node=True),
    "WanImageToVideo": dict(required={"positive": LINK("CONDITIONING"), "negative": LINK("CONDITIONING"),
                                      "vae": LINK("VAE"), "width": INT(832, 16, 16384, 16),
                                      "height": INT(480, 16, 16384, 16), "length": INT(81, 1, 16384, 4),
                                      "batch_size": INT(1, 1, 4096)},
                            optional={"clip_vision_output": LINK("CLIP_VISION_OUTPUT"), "start_image": LINK("IMAGE")},
                            outputs=("CONDITIONING", "CONDITIONING", "LATENT")),
    "WanFirstLastFrameToVideo": dict(
        required={"positive": LINK("CONDITIONING"), "negative": LINK("CONDITIONING"), "vae": LINK("VAE"),
                  "width": INT(832, 16, 16384, 16), "height": INT(480, 16, 16384, 16),
                  "length": INT(81, 1, 16384, 4), "batch_size": INT(1, 1, 4096)},
        optional={"clip_vision_start_image": LINK("CLIP_VISION_OUTPUT"),
                  "clip_vision_end_image": LINK("CLIP_VISION_OUTPUT"), "start_image": LINK("IMAGE"),
                  "end_image": LINK("IMAGE")},
        outputs=("CONDITIONING", "CONDITIONING", "LATENT")),
    # VideoHelperSuite's Video Combine keeps its widgets as a dict; a stand-in with some of its inputs
    "VHS_VideoCombine": dict(required={"images": LINK("IMAGE"), "frame_rate": FLOAT(8, 1, 120),
                                       "loop_count": INT(0, 0, 100), "filename_prefix": STRING("AnimateDiff"),
                                       "format": CHOICE(["image/gif", "video/h264-mp4"]),
                                       "pingpong": BOOLEAN(False), "save_output": BOOLEAN(True)},
                             output_node=True),
}
ADDED = []


@pytest.fixture(autouse=True, scope="module")
def comfy_nodes():
    for name, spec in COMFY.items():
        if name not in NODES:
            node(name, **spec)(lambda ctx, **kw: None)
            ADDED.append(name)
    yield
    for name in ADDED:
        NODES.pop(name, None)


def _template(name):
    return json.loads((TEMPLATES / name).read_text())


def _check_kinds(api, expected):
    assert {k: v["class_type"] for k, v in api.items()} == expected
    json.dumps(api)  # plain JSON, as POST /prompt carries it


def test_text_to_video_wan():
    api = to_api(_template("text_to_video_wan.json"))
    _check_kinds(api, {"3": "KSampler", "6": "CLIPTextEncode", "7": "CLIPTextEncode", "8": "VAEDecode",
                       "37": "UNETLoader", "38": "CLIPLoader", "39": "VAELoader", "40": "EmptyHunyuanLatentVideo",
                       "48": "ModelSamplingSD3", "49": "CreateVideo", "50": "SaveVideo"})
    assert api["3"]["inputs"] == {"seed": 82628696717253, "steps": 30, "cfg": 6, "sampler_name": "uni_pc",
                                  "scheduler": "simple", "denoise": 1, "model": ["48", 0], "positive": ["6", 0],
                                  "negative": ["7", 0], "latent_image": ["40", 0]}
    assert api["40"]["inputs"] == {"width": 832, "height": 480, "length": 33, "batch_size": 1}
    assert api["38"]["inputs"] == {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                   "device": "default"}
    assert api["37"]["inputs"] == {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}
    assert api["39"]["inputs"] == {"vae_name": "wan_2.1_vae.safetensors"}
    assert api["48"]["inputs"] == {"shift": 8, "model": ["37", 0]}
    assert api["6"]["inputs"]["text"].startswith("a fox moving quickly") and api["6"]["inputs"]["clip"] == ["38", 0]
    assert api["7"]["inputs"]["clip"] == ["38", 0] and api["7"]["inputs"]["text"].startswith("色调艳丽")
    assert api["8"]["inputs"] == {"samples": ["3", 0], "vae": ["39", 0]}
    assert api["49"]["inputs"] == {"fps": 16, "images": ["8", 0]}  # the unconnected optional audio is left out
    assert api["50"]["inputs"] == {"filename_prefix": "video/ComfyUI", "format": "auto", "codec": "auto",
                                   "video": ["49", 0]}
    assert api["6"]["_meta"] == {"title": "CLIP Text Encode (Positive Prompt)"}


def test_image_to_video_wan():
    api = to_api(_template("image_to_video_wan.json"))
    assert "57" not in api  # the MarkdownNote
    _check_kinds(api, {"3": "KSampler", "6": "CLIPTextEncode", "7": "CLIPTextEncode", "8": "VAEDecode",
                       "37": "UNETLoader", "38": "CLIPLoader", "39": "VAELoader", "49": "CLIPVisionLoader",
                       "50": "WanImageToVideo", "51": "CLIPVisionEncode", "52": "LoadImage",
                       "54": "ModelSamplingSD3", "55": "CreateVideo", "56": "SaveVideo"})
    assert api["52"]["inputs"] == {"image": "image_to_video_wan_start_image.png"}  # the upload button's value goes
    assert api["51"]["inputs"] == {"crop": "none", "clip_vision": ["49", 0], "image": ["52", 0]}
    assert api["50"]["inputs"] == {"width": 512, "height": 512, "length": 33, "batch_size": 1,
                                   "positive": ["6", 0], "negative": ["7", 0], "vae": ["39", 0],
                                   "clip_vision_output": ["51", 0], "start_image": ["52", 0]}
    k = api["3"]["inputs"]
    assert (k["seed"], k["steps"], k["cfg"], k["sampler_name"], k["scheduler"], k["denoise"]) == \
        (987948718394761, 20, 6, "uni_pc", "simple", 1)
    assert (k["model"], k["positive"], k["negative"], k["latent_image"]) == (["54", 0], ["50", 0], ["50", 1], ["50", 2])
    assert api["37"]["inputs"]["unet_name"] == "wan2.1_i2v_480p_14B_fp16.safetensors"
    assert api["49"]["inputs"] == {"clip_name": "clip_vision_h.safetensors"}


def test_flf2v_wan():
    api = to_api(_template("wan2.1_flf2v_720_f16.json"))
    assert "89" not in api
    assert api["83"]["class_type"] == "WanFirstLastFrameToVideo"
    assert api["83"]["inputs"] == {"width": 720, "height": 1280, "length": 33, "batch_size": 1,
                                   "positive": ["6", 0], "negative": ["7", 0], "vae": ["39", 0],
                                   "clip_vision_start_image": ["51", 0], "clip_vision_end_image": ["87", 0],
                                   "start_image": ["52", 0], "end_image": ["72", 0]}
    assert api["90"]["inputs"]["cfg"] == 3 and api["90"]["inputs"]["steps"] == 20
    assert api["90"]["inputs"]["seed"] == 1012535162155917 and api["90"]["inputs"]["latent_image"] == ["83", 2]
    assert api["52"]["_meta"]["title"] == "Start_image" and api["72"]["_meta"]["title"] == "End_image"
    assert api["72"]["inputs"] == {"image": "wan2.1_flf2v_720_f16_end_image.png"}
    assert api["87"]["inputs"] == {"crop": "none", "clip_vision": ["49", 0], "image": ["72", 0]}
    assert api["8"]["inputs"] == {"samples": ["90", 0], "vae": ["39", 0]}
    assert len(api) == 16


def test_api_format_passes_through():
    api = {"1": {"class_type": "KSampler", "inputs": {"seed": 1}}}
    assert to_api(api) is api
    assert to_api([1]) == [1]


# -- frontend-only constructs ------------------------------------------------------------------------------
def _n(nid, kind, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    rec = {"id": nid, "type": kind, "mode": mode, "inputs": list(inputs), "outputs": list(outputs)}
    if widgets is not None:
        rec["widgets_values"] = widgets
    if title:
        rec["title"] = title
    return rec


def _in(name, typ, link, widget=False):
    rec = {"name": name, "type": typ, "link": link}
    if widget:
        rec["widget"] = {"name": name}
    return rec


def _graph(*nodes, links):
    return {"nodes": list(nodes), "links": [link if isinstance(link, dict) else list(link) for link in links],
            "version": 0.4}


def test_reroute_primitive_note_and_converted_widget():
    g = _graph(
        _n(1, "UNETLoader", ["a.safetensors", "default"]),
        _n(2, "Reroute", None, [_in("", "*", 1)]),
        _n(3, "Reroute", None, [_in("", "*", 2)]),
        _n(4, "PrimitiveNode", [123, "fixed"], outputs=[{"name": "INT", "type": "INT", "widget": {"name": "seed"}}]),
        _n(5, "KSampler", [5, "randomize", 12, 4.5, "euler", "simple", 0.8],
           [_in("model", "MODEL", 3), _in("positive", "CONDITIONING", None), _in("negative", "CONDITIONING", None),
            _in("latent_image", "LATENT", None), _in("seed", "INT", 4, widget=True)]),
        _n(6, "Note", ["remember"]),
        _n(7, "MarkdownNote", ["# hi"]),
        links=[(1, 1, 0, 2, 0, "MODEL"), (2, 2, 0, 3, 0, "*"), (3, 3, 0, 5, 0, "MODEL"), (4, 4, 0, 5, 4, "INT")])
    api = to_api(g)
    assert set(api) == {"1", "5"}
    assert api["5"]["inputs"] == {"seed": 123, "steps": 12, "cfg": 4.5, "sampler_name": "euler", "scheduler": "simple",
                                  "denoise": 0.8, "model": ["1", 0]}


def test_converted_widget_takes_the_link():
    g = _graph(
        _n(1, "EmptyHunyuanLatentVideo", [640, 360, 17, 1]),
        _n(2, "CLIPTextEncode", ["x"], [_in("clip", "CLIP", None)]),
        _n(3, "KSampler", [5, "fixed", 12, 4.5, "euler", "simple", 0.8],
           [_in("model", "MODEL", None), _in("positive", "CONDITIONING", 2), _in("negative", "CONDITIONING", 3),
            _in("latent_image", "LATENT", 1), _in("steps", "INT", 4, widget=True)]),
        _n(4, "T_IntSource", [9], outputs=[{"name": "INT", "type": "INT"}]),
        links=[{"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 3, "target_slot": 3, "type": "LATENT"},
               {"id": 2, "origin_id": 2, "origin_slot": 0, "target_id": 3, "target_slot": 1, "type": "CONDITIONING"},
               {"id": 3, "origin_id": 2, "origin_slot": 0, "target_id": 3, "target_slot": 2, "type": "CONDITIONING"},
               {"id": 4, "origin_id": 4, "origin_slot": 0, "target_id": 3, "target_slot": 4, "type": "INT"}])
    api = to_api(g)  # links in the object form of newer frontends
    assert api["3"]["inputs"]["steps"] == ["4", 0]  # the link wins over the widget's stored value
    assert api["3"]["inputs"]["seed"] == 5 and api["3"]["inputs"]["latent_image"] == ["1", 0]
    assert api["3"]["inputs"]["positive"] == ["2", 0] == api["3"]["inputs"]["negative"]
    assert api["4"] == {"inputs": {}, "class_type": "T_IntSource", "_meta": {"title": "T_IntSource"}}  # unknown: kept


def test_muted_and_bypassed_nodes():
    g = _graph(
        _n(1, "UNETLoader", ["a.safetensors", "default"]),
        _n(2, "ModelSamplingSD3", [5.0], [_in("model", "MODEL", 1)], mode=4),  # bypassed: its model input passes on
        _n(3, "LoraLoaderModelOnly", ["l.safetensors", 1.0], [_in("model", "MODEL", 2)], mode=4),
        _n(4, "CLIPTextEncode", ["muted"], [_in("clip", "CLIP", None)], mode=2),
        _n(5, "KSampler", [1, "fixed", 2, 1.0, "euler", "simple", 1.0],
           [_in("model", "MODEL", 3), _in("positive", "CONDITIONING", 4), _in("negative", "CONDITIONING", None),
            _in("latent_image", "LATENT", None)]),
        _n(6, "WanImageToVideo", [64, 64, 5, 1],
           [_in("positive", "CONDITIONING", 9), _in("negative", "CONDITIONING", 5), _in("vae", "VAE", None)],
           mode=4),
        _n(7, "KSampler", [1, "fixed", 2, 1.0, "euler", "simple", 1.0],
           [_in("model", "MODEL", 6), _in("positive", "CONDITIONING", 7), _in("negative", "CONDITIONING", 10),
            _in("latent_image", "LATENT", 8)]),
        _n(8, "CLIPTextEncode", ["neg"], [_in("clip", "CLIP", None)]),
        _n(9, "CLIPTextEncode", ["pos"], [_in("clip", "CLIP", None)]),
        links=[(1, 1, 0, 2, 0, "MODEL"), (2, 2, 0, 3, 0, "MODEL"), (3, 3, 0, 5, 0, "MODEL"),
               (4, 4, 0, 5, 1, "CONDITIONING"), (5, 8, 0, 6, 1, "CONDITIONING"), (6, 3, 0, 7, 0, "MODEL"),
               (7, 6, 1, 7, 1, "CONDITIONING"), (8, 6, 2, 7, 3, "LATENT"), (9, 9, 0, 6, 0, "CONDITIONING"),
               (10, 6, 0, 7, 2, "CONDITIONING")])
    api = to_api(g)
    assert set(api) == {"1", "5", "7", "8", "9"}
    assert api["5"]["inputs"]["model"] == ["1", 0]  # through two bypassed nodes
    assert "positive" not in api["5"]["inputs"]  # from a muted node: dropped
    # a bypassed node hands on its input at the output's slot when the type matches, else its first of the type
    assert api["7"]["inputs"]["positive"] == ["8", 0] and api["7"]["inputs"]["negative"] == ["9", 0]
    assert "latent_image" not in api["7"]["inputs"]  # no LATENT input to pass through


def test_set_get_nodes():
    g = _graph(
        _n(1, "VAELoader", ["wan_2.1_vae.safetensors"]),
        _n(2, "SetNode", ["VAE"], [_in("VAE", "VAE", 1)], title="Set_VAE"),
        _n(3, "GetNode", ["VAE"], title="Get_VAE"),
        _n(4, "VAEDecode", [], [_in("samples", "LATENT", None), _in("vae", "VAE", 2)]),
        links=[(1, 1, 0, 2, 0, "VAE"), (2, 3, 0, 4, 1, "VAE")])
    api = to_api(g)
    assert set(api) == {"1", "4"} and api["4"]["inputs"] == {"vae": ["1", 0]}
    g["nodes"][1]["widgets_values"] = ["other"]
    with pytest.raises(KinemaError, match="no SetNode sets it"):
        to_api(g)


def test_vhs_dict_widgets():
    g = _graph(
        _n(1, "VAEDecode", [], [_in("samples", "LATENT", None), _in("vae", "VAE", None)]),
        _n(2, "VHS_VideoCombine", {"frame_rate": 16, "loop_count": 0, "filename_prefix": "Wan", "format": "video/h264-mp4",
                                   "pix_fmt": "yuv420p", "crf": 19, "save_metadata": True, "pingpong": False,
                                   "save_output": True, "videopreview": {"hidden": False, "params": {}}},
           [_in("images", "IMAGE", 1)]),
        links=[(1, 1, 0, 2, 0, "IMAGE")])
    api = to_api(g)
    assert api["2"]["inputs"] == {"frame_rate": 16, "loop_count": 0, "filename_prefix": "Wan",
                                  "format": "video/h264-mp4", "pix_fmt": "yuv420p", "crf": 19, "save_metadata": True,
                                  "pingpong": False, "save_output": True, "images": ["1", 0]}


def test_malformed_ui_is_a_clear_error():
    with pytest.raises(KinemaError, match="not a valid ComfyUI"):
        to_api({"nodes": [{"id": 1, "type": "VAELoader", "inputs": "x"}], "links": []})
    with pytest.raises(KinemaError, match="without an id"):
        to_api({"nodes": [5], "links": []})
    sub = {"nodes": [{"id": 1, "type": "abc-123", "inputs": [], "outputs": []}], "links": [],
           "definitions": {"subgraphs": [{"id": "abc-123", "nodes": []}]}}
    with pytest.raises(KinemaError, match="subgraph"):
        to_api(sub)


@pytest.mark.parametrize("name, loaders", [
    ("text_to_video_wan.json", {"37": "unet_name", "38": "clip_name", "39": "vae_name"}),
    ("image_to_video_wan.json", {"37": "unet_name", "38": "clip_name", "39": "vae_name", "49": "clip_name",
                                 "52": "image"}),
    ("wan2.1_flf2v_720_f16.json", {"37": "unet_name", "38": "clip_name", "39": "vae_name", "49": "clip_name",
                                   "52": "image", "72": "image"}),
])
def test_converted_templates_validate_but_for_their_files(tmp_path, name, loaders):
    """The converted prompt is one ComfyUI would accept given the model files and images: the only errors are
    the file names no folder holds."""
    from kinema.workflow.executor import Executor
    from kinema.workflow.folders import ModelFolders
    from kinema.workflow.validate import PromptError, validate_prompt

    ctx = Executor(ModelFolders(), tmp_path / "output", input_dir=tmp_path / "input").context()
    with pytest.raises(PromptError) as info:
        validate_prompt(to_api(_template(name)), ctx)
    errors = {nid: [(e["type"], e["extra_info"].get("input_name")) for e in entry["errors"]]
              for nid, entry in info.value.node_errors.items()}
    assert errors == {nid: [("value_not_in_list", input_name)] for nid, input_name in loaders.items()}


def _mutate(rng, value, depth=0):
    """A random damage somewhere in a JSON structure."""
    junk = [None, -1, 0, 10**30, float("nan"), "", "x", [], {}, [1, 2], {"id": None}, True, [[[[]]]]]
    if isinstance(value, dict) and value and depth < 6 and rng.random() < 0.8:
        key = rng.choice(list(value))
        if rng.random() < 0.15:
            del value[key]
        else:
            value[key] = _mutate(rng, value[key], depth + 1)
        return value
    if isinstance(value, list) and value and depth < 6 and rng.random() < 0.8:
        i = rng.randrange(len(value))
        if rng.random() < 0.15:
            del value[i]
        else:
            value[i] = _mutate(rng, value[i], depth + 1)
        return value
    return rng.choice(junk)


def test_damaged_ui_workflows_give_a_prompt_or_a_clear_error():
    import copy
    import random

    from kinema.workflow.validate import PromptError, validate_prompt

    rng = random.Random(7)
    base = [_template(n) for n in ("text_to_video_wan.json", "image_to_video_wan.json", "wan2.1_flf2v_720_f16.json")]
    outcomes = {"converted": 0, "refused": 0}
    for _ in range(200):
        wf = copy.deepcopy(rng.choice(base))
        for _ in range(rng.randint(1, 4)):
            wf = _mutate(rng, wf)
        try:
            api = to_api(wf)
        except KinemaError:
            outcomes["refused"] += 1
            continue
        outcomes["converted"] += 1
        try:
            validate_prompt(api)
        except PromptError:
            pass
    assert outcomes["converted"] > 50 and outcomes["refused"] > 0, outcomes  # both paths taken
