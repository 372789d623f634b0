"""ComfyUI's newer jobs view (GET /api/jobs, /api/jobs/{id}): the queue and the history as one list of
job records, which ComfyUI's current frontend reads for its queue panel."""

from __future__ import annotations

PREVIEWABLE = ("images", "video", "audio", "gifs")
HISTORY_STATES = ("completed", "failed", "cancelled")
ALL_STATES = ("pending", "in_progress", *HISTORY_STATES)


def _meta(extra_data: dict) -> dict:
    workflow = (extra_data.get("extra_pnginfo") or {}).get("workflow") if isinstance(extra_data, dict) else None
    return {"create_time": extra_data.get("create_time"),
            "workflow_id": workflow.get("id") if isinstance(workflow, dict) else None}


def _pruned(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def queued_job(item: list, status: str) -> dict:
    number, prompt_id, _, extra_data, _ = item
    return _pruned({"id": prompt_id, "status": status, "priority": number, "outputs_count": 0, **_meta(extra_data)})


def history_job(prompt_id: str, entry: dict, full: bool = False) -> dict:
    number, _, prompt, extra_data, _ = entry["prompt"]
    status = entry.get("status") or {}
    start = end = error = None
    interrupted = False
    for name, data in status.get("messages", []):
        if not isinstance(data, dict):
            continue
        if name == "execution_start":
            start = data.get("timestamp")
        elif name in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            error = data if name == "execution_error" else error
            interrupted |= name == "execution_interrupted"
    state = "completed" if status.get("status_str", "success") == "success" else "cancelled" if interrupted else "failed"
    count, preview = 0, None
    for node_id, ui in (entry.get("outputs") or {}).items():
        for media, items in (ui.items() if isinstance(ui, dict) else ()):
            if media == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if preview is None and (media in PREVIEWABLE or str(item.get("format", "")).startswith("video/")):
                    preview = {**item, "nodeId": node_id, "mediaType": "video" if media == "gifs" else media}
    job = _pruned({"id": prompt_id, "status": state, "priority": number, "execution_start_time": start,
                   "execution_end_time": end, "execution_error": error, "outputs_count": count,
                   "preview_output": preview, **_meta(extra_data)})
    if full:
        job.update(outputs=entry.get("outputs", {}), execution_status=status,
                   workflow={"prompt": prompt, "extra_data": extra_data})
    return job


def all_jobs(running: list, pending: list, history: dict, states=ALL_STATES, workflow_id=None, sort_by="created_at",
             order="desc") -> list[dict]:
    jobs = [queued_job(i, "in_progress") for i in running] if "in_progress" in states else []
    jobs += [queued_job(i, "pending") for i in pending] if "pending" in states else []
    if set(states) & set(HISTORY_STATES):
        jobs += [j for pid, e in history.items() if (j := history_job(pid, e))["status"] in states]
    if workflow_id:
        jobs = [j for j in jobs if j.get("workflow_id") == workflow_id]
    if sort_by == "execution_duration":
        key = lambda j: (j.get("execution_end_time") or 0) - (j.get("execution_start_time") or 0)  # noqa: E731
    else:
        key = lambda j: j.get("create_time") or 0  # noqa: E731
    return sorted(jobs, key=key, reverse=order == "desc")
