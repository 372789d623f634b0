"""LoRA for the Wan2.1 DiT: adapters for training (`inject_lora`), merging into weights for
inference (`merge_lora`, `apply_loras`) and LoRA files in the common layouts (`save_lora`, `load_lora`)."""

from kinema.lora.formats import Delta
from kinema.lora.files import apply_loras, load_lora, lora_metadata, parse_lora_spec, read_lora, read_loras, save_lora
from kinema.lora.network import (
    DEFAULT_TARGETS,
    GROUPS,
    LoRAAdapter,
    check_lora,
    inject_lora,
    lora_adapters,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    merge_loras,
    remove_lora,
)

__all__ = [
    "DEFAULT_TARGETS", "Delta", "GROUPS", "LoRAAdapter", "apply_loras", "check_lora", "inject_lora", "load_lora", "lora_adapters",
    "lora_metadata", "lora_parameters", "lora_state_dict", "merge_lora", "merge_loras", "parse_lora_spec", "read_lora", "read_loras",
    "remove_lora",
    "save_lora",
]
