"""ComfyUI's `fp8_e4m3fn_fast` and the wrapper's `*_fast` quantizations: fp8 weights with fp8 matmuls where the
device has them; on this CPU the same fp8 weights, upcast per layer, with a warning saying so."""

import logging

from kinema.workflow.context import ExecutionContext
from kinema.workflow.folders import ModelFolders
from kinema.workflow.nodes import comfy, wrapper


def test_fast_fp8_modes_fall_back_with_a_warning(tmp_path, caplog):
    ctx = ExecutionContext(ModelFolders(), tmp_path, tmp_path, tmp_path)
    (fast,) = comfy.unet_loader(ctx, "kinema_builtin_dit.safetensors", "fp8_e4m3fn_fast")
    (plain,) = comfy.unet_loader(ctx, "kinema_builtin_dit.safetensors", "fp8_e4m3fn")
    assert fast.fp8_fast and not plain.fp8_fast and fast.quantization == plain.quantization == "fp8_e4m3fn"
    (wrapped,) = wrapper.model_loader(ctx, "kinema_builtin_dit.safetensors", "fp32", "fp8_e4m3fn_fast")
    assert wrapped.fp8_fast and wrapped.quantization == "fp8_e4m3fn"
    with caplog.at_level(logging.WARNING, logger="kinema"):
        part = ctx.models.dit(fast)
    assert "fp8 fast matmuls are not available" in caplog.text
    assert part.quantization == "fp8_e4m3fn"
    ref = ctx.models.dit(plain)
    assert part is not ref  # two recipes, two cache entries
    a = {k: v for k, v in part.model.state_dict().items()}
    b = ref.model.state_dict()
    assert a.keys() == b.keys() and all((a[k].float() == b[k].float()).all() for k in a)  # the same fp8 weights
