"""ComfyUI-WanVideoWrapper's nodes, under its class names and input names."""
