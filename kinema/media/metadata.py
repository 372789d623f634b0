"""Generation metadata (prompt, seed, steps, ...) stored with every output.

A clip is only reproducible if its settings travel with it, so each writer
embeds the same JSON object where its format allows it and `read_metadata`
finds it again:

- mp4 / mov / webm: the container's `comment` tag (ffmpeg and most players
  show it; mp4 and mov are muxed with `movflags=use_metadata_tags`).
- png: an iTXt chunk named `kinema` (UTF-8, so prompts in any script survive).
- gif / webp / png-sequence: a sidecar `<name>.json` beside the output,
  because Pillow's animated writers have no reliable text field.

Technical facts the reader needs (the size before padding to even) live in
their own `kinema_*` container tags, not in the user's dictionary.
"""

from __future__ import annotations

import json
from pathlib import Path

from kinema.errors import KinemaError
from kinema.media.files import check_readable, is_image, open_container, open_image

COMMENT_TAG = "comment"  # container tag holding the JSON
FRAME_SIZE_TAG = "kinema_frame_size"  # "WxH" before padding to even
PNG_KEY = "kinema"  # PNG iTXt keyword


def to_json(metadata: dict) -> str:
    """The metadata as one JSON line; a value JSON cannot hold is named in the error."""
    if not isinstance(metadata, dict):
        raise KinemaError(f"metadata must be a dict, got {type(metadata).__name__}; pass e.g. {{'prompt': ...}}")
    for key, value in metadata.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise KinemaError(
                f"metadata[{key!r}] = {value!r} cannot be stored as JSON ({e}); "
                "convert it to a str, number, bool, list or dict first"
            ) from None
    return json.dumps(metadata, ensure_ascii=False)


def from_json(text: str | bytes | None) -> dict:
    """Parse stored metadata; anything that is not a JSON object (a foreign comment) gives {}."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def sidecar_path(path: Path) -> Path:
    """`clip.gif` -> `clip.gif.json`; a PNG-sequence folder `clip_00001` -> `clip_00001.json`."""
    return path.with_name(path.name + ".json")


def get_tag(tags: dict, key: str) -> str | None:
    """A container tag, ignoring case (Matroska/WebM upper-cases tag names)."""
    for k, v in tags.items():
        if k.lower() == key:
            return v
    return None


def read_metadata(path: str | Path) -> dict:
    """The metadata dict stored with an output written by `save_video`; {} if it has none.

    Works on mp4/mov/webm (container tag), png (text chunk), and gif/webp/
    png-sequence folders (sidecar `.json`).
    """
    path = Path(path)
    check_readable(path, allow_dir=True)
    sidecar = sidecar_path(path)
    if path.is_dir() or path.suffix.lower() in (".gif", ".webp"):
        return from_json(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    if is_image(path):
        with open_image(path) as im:
            found = from_json(im.info.get(PNG_KEY))
    else:
        with open_container(path) as container:
            found = from_json(get_tag(container.metadata, COMMENT_TAG))
    if not found and sidecar.is_file():
        found = from_json(sidecar.read_text(encoding="utf-8"))
    return found
