"""What the server costs: the same built-in-model t2v job through `kinema serve` and as a direct call.

Through the server: the ComfyUI core graph (kinema.server.examples.t2v_prompt: loaders, two
CLIPTextEncode, EmptyHunyuanLatentVideo, KSampler euler/simple, VAEDecode, SaveAnimatedWEBP) POSTed to
a server running in this process (uvicorn in a thread, the real routes, queue, worker and websocket),
timed from the POST to `execution_success` on the websocket. Directly: kinema.Pipeline(...) with the
same size, frames, steps, guidance, shift and solver, then Result.save to a lossless WebP. Both have
their models loaded already (one warm-up each); every run has its own seed and prompt, so neither
side is served from a cache (the executor's output cache would otherwise skip the text encoder).
A third column runs the same graph through the server's own Executor in this process with no HTTP or
queue in between, so the table separates what the server adds (server - graph) from what the node
graph costs over the Pipeline (graph - Pipeline: the nodes' own work, e.g. ComfyUI's schedule, step
previews). Also: the time from the POST to the first `progress` event (text encoding + one step).
Target: overhead <= 5% or <= 0.2 s.

    .venv/bin/python bench/server.py [--sizes 64x64x9,128x128x17] [--steps 4] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(out: Path):
    import httpx
    import uvicorn

    from kinema.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(output_dir=out / "output", input_dir=out / "input"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/prompt", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    return server, thread, port


def through_server(port: int, prompt: dict, preview: bool = True) -> tuple[float, float]:
    """(POST -> execution_success, POST -> first progress) in seconds."""
    import httpx
    import websocket

    cid = f"bench-{time.time_ns()}"
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId={cid}", timeout=600)
    ws.recv()  # status
    t0 = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/prompt", json={"prompt": prompt, "client_id": cid,
                                                                    "extra_data": {"preview": preview}}, timeout=60)
    r.raise_for_status()
    pid = r.json()["prompt_id"]
    first = None
    while True:
        frame = ws.recv()
        if isinstance(frame, bytes):
            continue
        msg = json.loads(frame)
        if msg["data"].get("prompt_id") not in (None, pid):
            continue
        if msg["type"] == "progress" and first is None:
            first = time.perf_counter() - t0
        if msg["type"] == "execution_success":
            done = time.perf_counter() - t0
            break
        if msg["type"] in ("execution_error", "execution_interrupted"):
            raise RuntimeError(f"the job failed: {msg['data']}")
    ws.close()
    return done, first


def direct(pipe, out: Path, text: str, w: int, h: int, f: int, steps: int, seed: int) -> float:
    t0 = time.perf_counter()
    result = pipe(text, negative_prompt="", size=f"{w}*{h}", frame_num=f, steps=steps, shift=3.0, guide_scale=4.0,
                  seed=seed, solver="euler", progress=False)
    result.save(out, format="webp", lossless=True, filename_prefix="direct")
    return time.perf_counter() - t0


def executor_direct(executor, prompt: dict) -> float:
    t0 = time.perf_counter()
    executor.execute(prompt, f"direct-{time.time_ns()}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64x64x9,128x128x17,192x192x17", help="WxHxFRAMES, comma-separated")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no_preview", action="store_true", help="no step previews on the websocket (extra_data.preview)")
    args = p.parse_args()

    import kinema
    from kinema.server.examples import t2v_prompt

    tmp = Path(tempfile.mkdtemp(prefix="kinema-bench-server-"))
    pipe = kinema.Pipeline.load(device=args.device)
    server, thread, port = start_server(tmp)
    executor = server.config.app.state.engine.executor  # the server's own: its loaded models, no HTTP in between
    text = "a red circle moving right on a black background"
    print(f"{'size':>12} {'Pipeline s':>10} {'graph s':>8} {'server s':>9} {'ratio':>6} {'overhead s':>10} "
          f"{'vs graph s':>10} {'1st progress s':>14}")
    seed = 0
    for size in args.sizes.split(","):
        w, h, f = (int(v) for v in size.split("x"))
        graph = lambda s: t2v_prompt(f"{text} {s}", width=w, height=h, length=f, steps=args.steps, seed=s,  # noqa: E731
                                     prefix="server")
        through_server(port, graph(seed))  # warm-up: models loaded on both sides
        direct(pipe, tmp / "direct", f"{text} {seed}", w, h, f, args.steps, seed)
        executor_direct(executor, graph(seed))
        d, g, s, firsts = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits both alike
            seed += 1
            d.append(direct(pipe, tmp / "direct", f"{text} {seed}", w, h, f, args.steps, seed))
            done, first = through_server(port, graph(seed), preview=not args.no_preview)
            seed += 1
            g.append(executor_direct(executor, graph(seed)))
            s.append(done)
            firsts.append(first)
        dm, gm, sm = statistics.median(d), statistics.median(g), statistics.median(s)
        print(f"{size:>12} {dm:10.3f} {gm:8.3f} {sm:9.3f} {sm / dm:6.3f} {sm - dm:10.3f} {sm - gm:10.3f} "
              f"{statistics.median(firsts):14.3f}")
    server.should_exit = True
    thread.join(30)


if __name__ == "__main__":
    main()
