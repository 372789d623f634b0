"""VideoHelperSuite's VHS_VideoCombine: frames -> a video or animated image, written by kinema.media.

Same inputs, format names and per-format options as VHS (its `video_formats/*.json`), its
`prefix_00001.ext` naming with the counter shared by the video and its first-frame PNG, its
`gifs` UI record and its VHS_FILENAMES output `(save_output, [files])`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kinema.errors import KinemaError
from kinema.workflow.types import BOOLEAN, CHOICE, FLOAT, INT, LINK, STRING, Input, NodeOutput, node

MODULE = "custom_nodes.ComfyUI-VideoHelperSuite"
CATEGORY = "Video Helper Suite 🎥🅥🅗🅢"

# VHS format -> (Kinema writer format, the format's widgets as VHS lists them, their defaults).
FORMATS = {
    "image/gif": ("gif", [], {}),
    "image/webp": ("webp", [["lossless", "BOOLEAN", {"default": True}]], {"lossless": True}),
    "video/ProRes": ("prores-mov", [["profile", ["hq", "4444"], {"default": "hq"}]], {"profile": "hq"}),
    "video/h264-mp4": ("h264-mp4", [["pix_fmt", ["yuv420p", "yuv420p10le"]],
                                    ["crf", "INT", {"default": 19, "min": 0, "max": 100, "step": 1}],
                                    ["save_metadata", "BOOLEAN", {"default": True}],
                                    ["trim_to_audio", "BOOLEAN", {"default": False}]],
                       {"pix_fmt": "yuv420p", "crf": 19}),
    "video/h265-mp4": ("h265-mp4", [["pix_fmt", ["yuv420p10le", "yuv420p"]],
                                    ["crf", "INT", {"default": 22, "min": 0, "max": 100, "step": 1}],
                                    ["save_metadata", "BOOLEAN", {"default": True}]],
                       {"pix_fmt": "yuv420p10le", "crf": 22}),
    "video/webm": ("webm", [["pix_fmt", ["yuv420p", "yuva420p"]],
                            ["crf", "INT", {"default": 20, "min": 0, "max": 100, "step": 1}],
                            ["save_metadata", "BOOLEAN", {"default": True}],
                            ["trim_to_audio", "BOOLEAN", {"default": False}]],
                   {"pix_fmt": "yuv420p", "crf": 20}),
}
PRORES_PIX_FMT = {"hq": "yuv422p10le", "4444": "yuv444p10le"}


def _widget_values(fmt: str) -> dict[str, list]:
    return {w[0]: w[1] for w in FORMATS[fmt][1] if isinstance(w[1], list)}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """IMAGE [F, H, W, 3] in [0, 1] -> uint8 [F, H, W, 3], rounded as VHS's tensor_to_bytes (255 x + 0.5, clipped)."""
    x = images[..., :3].detach().float().cpu()
    return np.ascontiguousarray(torch.clamp(x * 255 + 0.5, 0, 255).to(torch.uint8).numpy())


def save_place(base: Path, filename_prefix: str) -> tuple[Path, str, str]:
    """ComfyUI's get_save_image_path: 'sub/dir/name' -> (folder, name, subfolder), confined to `base`."""
    prefix = filename_prefix.replace("\\", "/")
    sub, _, name = prefix.rpartition("/")
    base = Path(base).resolve()
    folder = (base / sub).resolve() if sub else base
    if folder != base and base not in folder.parents or not name or name in (".", ".."):
        raise KinemaError(f"VHS_VideoCombine.filename_prefix {filename_prefix!r} would save outside the output folder; "
                          "use a name such as 'WanVideo' or 'sub/WanVideo'.")
    return folder, name, "" if folder == base else folder.relative_to(base).as_posix()


@node("VHS_VideoCombine", module=MODULE, category=CATEGORY, outputs=("VHS_FILENAMES",), output_names=("Filenames",),
      output_node=True, display_name="Video Combine 🎥🅥🅗🅢",
      hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
      required={"images": LINK("IMAGE"),
                "frame_rate": FLOAT(8, 1, 1e9, 1),
                "loop_count": INT(0, 0, 100, tooltip="gif / webp: times the animation repeats (0 = forever); "
                                                     "videos: extra copies appended, as VHS's loop filter"),
                "filename_prefix": STRING("AnimateDiff"),
                "format": CHOICE(list(FORMATS), "image/gif",
                                 extra={"formats": {k: v[1] for k, v in FORMATS.items()}}),
                "pingpong": BOOLEAN(False),
                "save_output": BOOLEAN(True)},
      optional={"audio": LINK("AUDIO"), "meta_batch": LINK("VHS_BatchManager"), "vae": LINK("VAE"),
                # The per-format widgets (VHS adds them for the format chosen; API prompts carry them as inputs).
                "pix_fmt": CHOICE(["yuv420p", "yuv420p10le", "yuva420p"]),
                "crf": Input("INT", None, 0, 100, 1),
                "save_metadata": BOOLEAN(True),
                "trim_to_audio": BOOLEAN(False),
                "lossless": BOOLEAN(True),
                "profile": CHOICE(["hq", "4444"])})
def video_combine(ctx, images, frame_rate, loop_count, filename_prefix="AnimateDiff", format="image/gif",
                  pingpong=False, save_output=True, audio=None, meta_batch=None, vae=None, pix_fmt=None, crf=None,
                  save_metadata=True, trim_to_audio=False, lossless=True, profile="hq", prompt=None,
                  extra_pnginfo=None, unique_id=None):
    """Combine frames into a video file (VHS's Video Combine), named prefix_00001.ext beside a first-frame PNG."""
    from kinema.media import save_video

    n = "VHS_VideoCombine"
    for name, value, what in (("audio", audio, "muxing audio"), ("meta_batch", meta_batch, "batch managers"),
                              ("vae", vae, "decoding latents")):
        if value is not None:
            raise KinemaError(f"{n}.{name}: {what} is not supported by Kinema yet; disconnect {name}.")
    if format not in FORMATS:
        raise KinemaError(f"{n}.format {format!r} is not supported by Kinema; use one of {', '.join(FORMATS)}.")
    writer, _, defaults = FORMATS[format]
    choices = _widget_values(format)
    pix_fmt = pix_fmt or defaults.get("pix_fmt")
    if "pix_fmt" in choices and pix_fmt not in choices["pix_fmt"]:
        raise KinemaError(f"{n}.pix_fmt {pix_fmt!r} does not go with {format}; "
                          f"use one of {', '.join(choices['pix_fmt'])}.")
    if format == "video/ProRes":
        if profile not in PRORES_PIX_FMT:
            raise KinemaError(f"{n}.profile {profile!r} is not supported; use one of {', '.join(PRORES_PIX_FMT)}.")
        pix_fmt = PRORES_PIX_FMT[profile]
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise KinemaError(f"{n}.images is not an IMAGE batch [F, H, W, 3] with at least one frame.")

    base = Path(ctx.output_dir if save_output else ctx.temp_dir)
    folder, name, subfolder = save_place(base, filename_prefix)
    frames = to_uint8(images)  # [F, H, W, 3]
    video = frames
    if pingpong:
        from kinema.media import pingpong_frames

        video = pingpong_frames(video)
    is_video = format.startswith("video/")
    if is_video and loop_count > 0:
        video = np.concatenate([video] * (int(loop_count) + 1))  # VHS's "-vf loop=N": N more copies
    prompt = prompt if prompt is not None else (ctx.prompt or None)
    extra_pnginfo = extra_pnginfo if extra_pnginfo is not None else ctx.extra_pnginfo
    metadata = None
    if save_metadata:
        metadata = {**({"prompt": prompt} if prompt else {}), **(extra_pnginfo or {})}
    folder.mkdir(parents=True, exist_ok=True)
    out = save_video(video, folder, format=writer, frame_rate=float(frame_rate),
                     loop_count=0 if is_video else int(loop_count),
                     crf=int(crf if crf is not None else defaults.get("crf", 19)),
                     pix_fmt=pix_fmt, lossless=bool(lossless), filename_prefix=name, metadata=metadata or None)
    files = [str(out)]
    first = out.with_suffix(".png").name  # the video's counter: prefix_00001.png beside prefix_00001.mp4, as VHS
    options = ((extra_pnginfo or {}).get("workflow") or {}).get("extra") or {}
    if options.get("VHS_MetadataImage", True) is not False:
        png = save_video(frames[:1], folder / first, format="png", metadata=metadata or None)
        files.insert(0, str(png))
    record = {"filename": out.name, "subfolder": subfolder, "type": "output" if save_output else "temp",
              "format": format, "frame_rate": frame_rate, "workflow": first, "fullpath": str(out)}
    return NodeOutput(((bool(save_output), files),), {"gifs": [record]})
