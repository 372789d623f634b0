"""Task defaults are the official generate.py / wan.configs values."""

import pytest

from kinema.errors import KinemaError
from kinema.pipeline.tasks import FLF2V_NEGATIVE_PROMPT, I2V_NEGATIVE_PROMPT, NEGATIVE_PROMPT, get_task


@pytest.mark.parametrize(
    "name,steps,shift480,shift720,frames,model",
    [
        ("t2v-1.3B", 50, 5.0, 5.0, 81, "t2v"),
        ("t2v-14B", 50, 5.0, 5.0, 81, "t2v"),
        ("i2v-14B", 40, 3.0, 5.0, 81, "i2v"),
        ("flf2v-14B", 50, 16.0, 16.0, 81, "flf2v"),
        ("t2i-14B", 50, 5.0, 5.0, 1, "t2v"),
        ("v2v", 50, 5.0, 5.0, 81, "t2v"),
    ],
)
def test_official_defaults(name, steps, shift480, shift720, frames, model):
    task = get_task(name)
    assert (task.steps, task.frame_num, task.model_type, task.guide_scale) == (steps, frames, model, 5.0)
    assert task.default_shift("832*480") == shift480 and task.default_shift("1280*720") == shift720


def test_negative_prompts():
    assert NEGATIVE_PROMPT.startswith("色调艳丽，过曝") and NEGATIVE_PROMPT.endswith("倒着走")
    assert get_task("t2v").negative_prompt == NEGATIVE_PROMPT
    assert get_task("i2v").negative_prompt == I2V_NEGATIVE_PROMPT == "镜头晃动，" + NEGATIVE_PROMPT
    assert get_task("flf2v").negative_prompt == FLF2V_NEGATIVE_PROMPT == "镜头切换，镜头晃动，" + NEGATIVE_PROMPT


def test_unknown_task():
    with pytest.raises(KinemaError, match="unknown task 'x2v'.*t2v-1.3B"):
        get_task("x2v")
