"""Workflows: typed nodes (ComfyUI's core Wan nodes, ComfyUI-WanVideoWrapper's, VideoHelperSuite's Video
Combine, Kinema's own), the model folders they pick files from, and the executor that validates and runs
a workflow in ComfyUI's API or UI format. `kinema run` and `kinema serve` both run workflows through it."""
