"""The Wan2.1 tasks and their official defaults, as data.

Defaults follow the official `generate.py` and `wan/configs`: 50 steps (40 for
i2v), shift 5.0 (3.0 for i2v at 480p, 16 for flf2v), guidance 5.0, 81 frames
(1 for t2i), the UniPC solver, and a negative prompt per task family.
"""

from __future__ import annotations

from dataclasses import dataclass

from kinema.errors import KinemaError

ANY_MODEL = "any"  # a task every DiT variant can run
TEXT_LEN = 512  # the text context is padded with zeros to this many tokens, as the reference does

NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
I2V_NEGATIVE_PROMPT = "镜头晃动，" + NEGATIVE_PROMPT  # "camera shake, "
FLF2V_NEGATIVE_PROMPT = "镜头切换，" + I2V_NEGATIVE_PROMPT  # "camera cut, "


@dataclass(frozen=True)
class Task:
    """A task as data: the DiT variant it runs on, the inputs it needs, its official defaults.
    The pipeline, the command line and the memory plan all read this one declaration."""

    name: str  # t2v | i2v | flf2v | t2i | v2v | extend
    model_type: str  # the DiT variant it needs: t2v | i2v | flf2v, or ANY_MODEL
    images: tuple[str, ...] = ()  # image inputs it needs, in frame order: ("image",) or ("first_frame", "last_frame")
    video: bool = False  # it starts from a source video (v2v)
    frames: int | None = None  # a fixed frame count (t2i: 1); None: any 4n + 1
    steps: int = 50
    shift: float = 5.0
    shift_480p: float | None = None  # i2v uses a smaller shift at 480p
    guide_scale: float = 5.0
    frame_num: int = 81
    size: str = "1280*720"
    negative_prompt: str = NEGATIVE_PROMPT

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every media input the task takes: its images, and "video" for v2v."""
        return self.images + (("video",) if self.video else ())

    @property
    def needs_clip(self) -> bool:
        """Known frames are also encoded by CLIP (i2v, flf2v)."""
        return bool(self.images)

    def known_frames(self, frame_num: int) -> dict[str, int]:
        """Which pixel frame each image input becomes: i2v {"image": 0}; flf2v {"first_frame": 0, "last_frame": F - 1}."""
        return {name: (0 if i == 0 else frame_num - 1) for i, name in enumerate(self.images)}

    def default_shift(self, size: str) -> float:
        if self.shift_480p is not None and size in ("832*480", "480*832"):
            return self.shift_480p
        return self.shift


TASKS = {
    "t2v": Task("t2v", "t2v"),
    "t2i": Task("t2i", "t2v", frames=1, frame_num=1),
    "v2v": Task("v2v", "t2v", video=True),
    "i2v": Task("i2v", "i2v", images=("image",), steps=40, shift_480p=3.0, negative_prompt=I2V_NEGATIVE_PROMPT),
    "flf2v": Task("flf2v", "flf2v", images=("first_frame", "last_frame"), shift=16.0, negative_prompt=FLF2V_NEGATIVE_PROMPT),
    # a video continued from its last frames (kinema/pipeline/extend.py): any DiT, the known frames through the
    # image condition where the DiT takes one, and by latent replacement on every DiT
    "extend": Task("extend", ANY_MODEL, video=True),
}

# The official task names (model size included) map onto the same tasks.
OFFICIAL_TASKS = {"t2v-1.3B": "t2v", "t2v-14B": "t2v", "i2v-14B": "i2v", "flf2v-14B": "flf2v", "t2i-14B": "t2i"}


def get_task(name: str) -> Task:
    key = OFFICIAL_TASKS.get(name, name) if isinstance(name, str) else name
    if key not in TASKS:
        names = ", ".join([*OFFICIAL_TASKS, *TASKS])
        raise KinemaError(f"unknown task {name!r}; choose one of: {names}.")
    return TASKS[key]


def task_using(input_name: str) -> str:
    """The name to suggest for a task that takes `input_name` (the official name where there is one)."""
    for name, task in TASKS.items():
        if input_name in task.inputs:
            return next((o for o, t in OFFICIAL_TASKS.items() if t == name), name)
    raise KeyError(input_name)
