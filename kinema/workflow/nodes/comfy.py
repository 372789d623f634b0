"""ComfyUI's core Wan nodes, under ComfyUI's class_type names, inputs and meaning."""
