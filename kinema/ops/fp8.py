"""fp8 weights: Linear layers stored in 8 bits and upcast one layer at a time when they run.

The Linear weights are nearly all the bytes of a Wan DiT or a umT5 encoder, so
storing them in fp8 halves the memory of a bf16 model. Three modes (`MODES`):

- `fp8_e4m3fn`: a plain cast (3 mantissa bits, range +-448). Weights below 2^-6
  fall into e4m3's subnormals and lose relative precision.
- `fp8_e5m2`: a plain cast (2 mantissa bits, range +-57344): coarser, never overflows.
- `fp8_e4m3fn_scaled`: one float32 scale per tensor, amax / 448, so the largest
  weight lands on e4m3's largest value and the small ones keep their precision.
  Stored as ComfyUI's scaled-fp8 files store it: `<layer>.weight` in fp8 and
  `<layer>.scale_weight`, so such files load as they are and Kinema's save as theirs.

What stays in the precision the model was loaded in follows the peers:
ComfyUI-WanVideoWrapper keeps `norm, bias, patch_embedding, time_, text_embedding,
img_emb, modulation, head`; LightX2V quantises only the blocks' matmuls (its pre
and post weights: embeddings, time projection, head, stay unquantised); ComfyUI's
scaled-fp8 Wan files do the same. Only `nn.Linear` layers are ever quantised, so
norms, modulation tables, the Conv3d patch embedding and `nn.Embedding`s (umT5's
token and position tables) keep their precision by construction; a model class's
`_skip_fp8_modules` names the Linear layers that stay too (WanDiT's: the embeddings,
time projection, head and norms). Biases stay in the compute dtype.

At compute, `FP8Linear` upcasts its weight to the compute dtype, multiplies by
the scale and runs an ordinary matmul: one layer's upcast copy exists at a time.
With `fast` on a CUDA GPU of compute capability >= 8.9 it calls torch._scaled_mm
instead, with the activations quantised to e4m3fn per tensor (a dynamic scale,
amax / 448; the peers clamp to +-448 with scale 1) and fp32 accumulation.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kinema.errors import KinemaError
from kinema.ops.cpu_half import linear


@dataclass(frozen=True)
class Mode:
    dtype: torch.dtype
    scaled: bool


MODES = {
    "fp8_e4m3fn": Mode(torch.float8_e4m3fn, scaled=False),
    "fp8_e5m2": Mode(torch.float8_e5m2, scaled=False),
    "fp8_e4m3fn_scaled": Mode(torch.float8_e4m3fn, scaled=True),
}
AUTO = "auto"  # loaders only: keep a checkpoint's own fp8 layout, leave a higher-precision one alone
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448



def skipped_modules(model: nn.Module) -> re.Pattern:
    """The Linear layers (module names) fp8 leaves in their loaded precision: the class's `_skip_fp8_modules`."""
    return re.compile("|".join(f"(?:{p})" for p in getattr(type(model), "_skip_fp8_modules", ())) or r"(?!)")


def check_mode(mode: str, allow_auto: bool = False, what: str = "quantization") -> str:
    if mode in MODES or (allow_auto and mode == AUTO):
        return mode
    auto = f" (or {AUTO}, which keeps a checkpoint's own fp8 layout)" if allow_auto else ""
    raise KinemaError(f"{what} {mode!r} is not an fp8 mode; use one of {', '.join(MODES)}{auto}.")


def mode_name(dtype: torch.dtype, scaled: bool) -> str:
    """The mode for weights stored as `dtype`, with scales or not (e5m2 has one mode: a file's scales are kept)."""
    if dtype == torch.float8_e4m3fn:
        return "fp8_e4m3fn_scaled" if scaled else "fp8_e4m3fn"
    return "fp8_e5m2"


def quantize_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (fp8 weight, float32 0-dim scale) with weight ~= fp8 * scale."""
    spec = MODES[check_mode(mode)]
    return _quantize(weight, spec.dtype, spec.scaled)


def _quantize(weight: torch.Tensor, dtype: torch.dtype, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.finfo(dtype).max
    w = weight.detach().float()
    if scaled:
        scale = (w.abs().amax() / top).clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero weight stays zero
        w = w / scale
    else:
        scale = torch.ones((), device=w.device)
    # Clamped: out of range values saturate rather than becoming NaN (e4m3fn) or inf (e5m2).
    return w.clamp(-top, top).to(dtype), scale.reshape(()).float()


class FP8Linear(nn.Linear):
    """A Linear whose weight [out, in] is stored in fp8 with a per-tensor float32 `scale_weight`.

    The bias stays in the compute dtype. Subclassing nn.Linear keeps `in_features` /
    `out_features` and lets LoRA adapters (forward hooks) attach to it as to any Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "fp8_e4m3fn_scaled",
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.compute_dtype = check_mode(mode), compute_dtype
        self.fast = False
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=MODES[mode].dtype, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("scale_weight", torch.ones((), device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, compute_dtype: torch.dtype | None = None) -> "FP8Linear":
        if hasattr(linear, "lora"):
            raise KinemaError("a Linear with a LoRA adapter cannot be quantised; merge_lora or remove_lora first.")
        w = linear.weight
        compute_dtype = compute_dtype or (w.dtype if w.dtype not in FP8_DTYPES else torch.bfloat16)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, compute_dtype, w.device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)  # kept as it was
        if not w.is_meta:  # on the meta device (loaders) the weights come later, from the file
            q, scale = quantize_weight(w, mode)
            layer.weight = nn.Parameter(q, requires_grad=False)
            layer.scale_weight = scale
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.weight.to(dtype or self.compute_dtype)
        return w.mul_(self.scale_weight.to(w.dtype))

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor) -> None:
        """weight += delta, computed in float32 and quantised again (how a LoRA merges into an fp8 layer).
        A layer with a scale (a scaled mode, or a scaled file) gets a new per-tensor scale."""
        scaled = MODES[self.mode].scaled or bool(self.scale_weight != 1)
        q, scale = _quantize(self.dequantized_weight(torch.float32) + delta, self.weight.dtype, scaled)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scale_weight = scale.to(q.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and x.is_cuda and _scaled_mm_device(x.device.index or 0):
            return scaled_mm_linear(x, self.weight, self.scale_weight, self.bias, self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return linear(x.to(self.compute_dtype), self.dequantized_weight(), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}, compute_dtype={self.compute_dtype}, fast={self.fast}")


# -- whole models -------------------------------------------------------------------------------------
def fp8_targets(model: nn.Module, keep: re.Pattern | None = None) -> list[str]:
    """Names of the Linear layers `quantize_fp8` converts: every nn.Linear outside `keep` (default: the model's own)."""
    keep = skipped_modules(model) if keep is None else keep
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, FP8Linear) and not keep.fullmatch(name)]


@torch.no_grad()
def quantize_fp8(model: nn.Module, mode: str, compute_dtype: torch.dtype | None = None, keep: re.Pattern | None = None,
                 fast: bool = False) -> nn.Module:
    """Replace the model's Linear layers (outside `keep`) by FP8Linear in place; returns the model.

    `compute_dtype` defaults to each layer's current weight dtype (a bf16 model computes in bf16).
    On the meta device only the layers are swapped; a loader fills them from the file.
    """
    check_mode(mode)
    for name in fp8_targets(model, keep):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, FP8Linear.from_linear(getattr(owner, child), mode, compute_dtype))
    if fast:
        set_fp8_fast(model)
    return model


def set_fp8_fast(model: nn.Module, enabled: bool = True) -> int:
    """Switch the torch._scaled_mm path on (or off) for every FP8Linear whose sizes it takes
    (both multiples of 16); returns how many layers use it. Where the GPU cannot run it
    (`fp8_fast_unavailable`), the layers keep upcasting, so a model can move between devices."""
    count = 0
    for m in model.modules():
        if isinstance(m, FP8Linear):
            m.fast = enabled and m.in_features % 16 == 0 and m.out_features % 16 == 0
            count += m.fast
    return count


def fp8_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as ComfyUI's fp8 files hold them: fp8 `weight`s; in a scaled mode also each
    `scale_weight` and the `scaled_fp8` marker, whose dtype names the format (a plain cast has neither)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    scaled = None
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            if MODES[m.mode].scaled or bool(m.scale_weight != 1):
                scaled = m.weight.dtype
            else:
                del state[f"{name}.scale_weight" if name else "scale_weight"]
    if scaled is not None:
        state["scaled_fp8"] = torch.empty(0, dtype=scaled)
    return state


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# -- the fp8 matmul ------------------------------------------------------------------------------------
def fp8_fast_unavailable(device: torch.device | str) -> str | None:
    """Why torch._scaled_mm cannot run on `device`, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the fp8 matmul needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or newer); the device is {device.type}"
    if not torch.cuda.is_available():
        return "the fp8 matmul needs CUDA, which this PyTorch cannot use"
    if not hasattr(torch, "_scaled_mm"):
        return f"this PyTorch ({torch.__version__}) has no torch._scaled_mm"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        return (f"the fp8 matmul needs compute capability >= 8.9 (Ada, Hopper or newer); "
                f"{torch.cuda.get_device_name(device)} has {cc[0]}.{cc[1]}")
    return None


@functools.lru_cache(maxsize=None)
def _scaled_mm_device(index: int) -> bool:
    return fp8_fast_unavailable(torch.device("cuda", index)) is None


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale_weight: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """x @ (weight * scale_weight).T + bias in one fp8 GEMM: x is quantised to e4m3fn with a
    per-tensor scale (e4m3 x e4m3 and e4m3 x e5m2 are the pairs the hardware takes)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()  # [M, K]
    scale_x = (x2.abs().amax() / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    rows = x2.shape[0]
    xq = (x2 / scale_x).clamp(-E4M3_MAX, E4M3_MAX)
    if rows % 16:  # _scaled_mm wants every dimension a multiple of 16
        xq = F.pad(xq, (0, 0, 0, -rows % 16))
    out = torch._scaled_mm(xq.to(torch.float8_e4m3fn), weight.t(), scale_a=scale_x, scale_b=scale_weight.float(),
                           out_dtype=out_dtype)  # weight.t(): the column-major [K, N] operand it wants
    out = out[:rows]
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*lead, weight.shape[0])
