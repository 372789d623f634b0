"""The HTTP server: ComfyUI's API over the workflow executor, a persisted queue, and the web page."""
