"""The web page at / in a real headless Chromium against a real `kinema serve` on the built-in model: fill the
t2v form, submit, watch the progress bar rise step by step with previews, the <video> play the result (its
duration is frames / fps, its clock advances), load the output file back into the form (its embedded
settings), get a server refusal shown as a message, then "run again" from the history and see a second,
identical result. KINEMA_SCREENSHOT=1 refreshes docs/web-page.png.

Needs Debian's `chromium` (`make test` installs it when run as root) and the playwright package (test
extras); without them the test is skipped and says why.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kinema.media import read_metadata, read_video

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving right on a black background"
FRAMES, FPS, STEPS, SEED = 17, 8, 8, 5  # the built-in model plays at 8 fps


def chromium() -> str | None:
    for name in (os.environ.get("KINEMA_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = name and shutil.which(name)
        if found:
            return found
    return None


def skip(request, reason: str):
    plugins = request.config.pluginmanager  # the reason on the terminal even under -q, past output capture
    terminal, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if terminal is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            terminal.write_line(f"\ntests/test_web_page.py skipped: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_exe(request):
    exe = chromium()
    if exe is None:
        skip(request, "no Chromium found (install Debian's chromium: apt-get install chromium, or set KINEMA_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip(request, "the playwright package is not installed (pip install -e '.[test]')")
    return exe


@pytest.fixture(scope="module")
def server(browser_exe, tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("web"))


def serve(root: Path, *extra: str):
    (root / "models" / "loras").mkdir(parents=True)
    port = free_port()
    kinema = Path(sys.executable).with_name("kinema")
    cmd = [str(kinema) if kinema.exists() else sys.executable, *([] if kinema.exists() else ["-m", "kinema.cli.main"]),
           "serve", "--port", str(port), "--output", str(root / "output"), "--input", str(root / "input"),
           "--models", str(root / "models"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/system_stats", timeout=2).read()
            break
        except urllib.error.HTTPError:  # up, and asking for its token
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"kinema serve did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)
    try:
        yield base, root
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(request, browser_exe):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=browser_exe,
                                  args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        except Exception as e:  # a browser that cannot start here (no display libraries, ...)
            skip(request, f"{browser_exe} did not start under playwright: {str(e).splitlines()[0]}")
        yield b
        b.close()


def open_page(browser, url, **context):
    pg = browser.new_context(viewport={"width": 1280, "height": 1000}, **context).new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(url)
    return pg


@pytest.fixture(scope="module")
def page(browser, server):
    return open_page(browser, server[0] + "/")


# Records every change of the progress bar and the preview image, with the page's clock.
WATCH = """() => {
  window.samples = []; window.previews = 0; window.queued = [];
  const bar = document.getElementById('progress'), img = document.getElementById('preview');
  new MutationObserver(() => document.querySelectorAll('#queue li').forEach(li => queued.push(li.textContent)))
    .observe(document.getElementById('queue'), {childList: true, subtree: true});
  new MutationObserver(() => samples.push([performance.now(), Number(bar.value), Number(bar.max)]))
    .observe(bar, {attributes: true, attributeFilter: ['value', 'max']});
  new MutationObserver(() => { if (img.src.startsWith('blob:')) previews++; })
    .observe(img, {attributes: true, attributeFilter: ['src']});
}"""


def wait_result(pg, not_id=None, timeout=90_000):
    pg.wait_for_function("""(old) => { const v = document.getElementById('result-media');
        return v && v.dataset.promptId !== old && (v.tagName === 'IMG' ? v.complete && v.naturalWidth > 0
            : v.readyState >= 1); }""", arg=not_id or "", timeout=timeout)
    return pg.eval_on_selector("#result-media", "v => v.dataset.promptId")


def test_page_runs_t2v_and_run_again(page, server, tmp_path):
    base, root = server
    pg = page
    pg.wait_for_function("document.querySelector('#ckpt option[value=builtin]') !== null", timeout=20_000)
    pg.wait_for_function("document.getElementById('connection').textContent === 'connected'", timeout=20_000)
    assert pg.eval_on_selector("#tasks [aria-selected=true]", "b => b.dataset.task") == "t2v"
    assert "unipc" in pg.eval_on_selector_all("#solver option", "os => os.map(o => o.value)")

    # A refusal from the server is a message on the page, which keeps working.
    pg.fill("#prompt", PROMPT)
    pg.fill("#width", "64")
    pg.fill("#height", "64")
    pg.fill("#frame_num", str(FRAMES))
    pg.fill("#steps", "5000")
    pg.click("#generate")
    pg.wait_for_selector(".message.error", timeout=10_000)
    text = pg.inner_text(".message.error")
    assert "KinemaGenerate" in text and "steps" in text, text
    pg.click(".message.error button")

    # The seed's random button gives a new whole number; then the run's own.
    pg.click("#seed-random")
    assert pg.input_value("#seed").isdigit() and int(pg.input_value("#seed")) >= 0
    pg.fill("#steps", str(STEPS))
    pg.fill("#seed", str(SEED))
    pg.evaluate(WATCH)
    pg.click("#generate")
    first = wait_result(pg)
    samples = pg.evaluate("samples")
    steps_seen = [v for _, v, m in samples if m == STEPS and 0 < v <= STEPS]
    assert len(set(steps_seen)) >= STEPS // 2, samples  # the bar moved through the steps, not just to the end
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] == STEPS, samples
    times = [t for t, v, m in samples if m == STEPS and 0 < v <= STEPS]
    assert times[-1] - times[0] > 100, samples  # rising over time (ms), as the steps ran
    assert pg.evaluate("previews") >= STEPS // 2  # step previews from the websocket's binary frames
    assert any("running · t2v: " + PROMPT in q for q in pg.evaluate("queued")), pg.evaluate("queued")

    # The result plays: its duration is frames / fps and its clock advances.
    pg.evaluate("document.getElementById('result-media').play()")
    duration = pg.eval_on_selector("#result-media", "v => v.duration")
    assert abs(duration - FRAMES / FPS) < 0.15, duration
    t0 = pg.eval_on_selector("#result-media", "v => v.currentTime")
    pg.wait_for_timeout(600)
    t1 = pg.eval_on_selector("#result-media", "v => v.currentTime")
    assert t1 != t0 and pg.eval_on_selector("#result-media", "v => !v.paused"), (t0, t1)
    href = pg.get_attribute("#download", "href")
    assert "kinema_00001.mp4" in href and pg.is_visible("#download")
    with urllib.request.urlopen(base + href) as r:  # the download link serves the file itself
        assert r.read()[4:8] == b"ftyp"
    out1 = root / "output" / "kinema_00001.mp4"
    clip = read_video(out1)
    assert clip.frames.shape == (FRAMES, 64, 64, 3) and clip.fps == FPS
    assert read_metadata(out1)["seed"] == SEED

    # The history shows the run with its settings; "Load" of the output file puts its settings back in the form.
    pg.wait_for_selector(f".card[data-prompt-id='{first}']", timeout=10_000)
    summary = pg.inner_text(f".card[data-prompt-id='{first}'] summary")
    assert f"seed {SEED}" in summary and f"{STEPS} steps" in summary, summary
    pg.fill("#seed", "999")
    pg.fill("#steps", "3")
    pg.set_input_files("#load-file", str(out1))
    pg.wait_for_function(f"document.getElementById('seed').value === '{SEED}'", timeout=10_000)
    assert pg.input_value("#steps") == str(STEPS) and pg.input_value("#prompt") == PROMPT

    # Run again from the history: the same prompt re-posted, its settings back in the form. The executor serves
    # an identical prompt from its cache (as ComfyUI does): a second history entry showing the same file.
    pg.fill("#seed", "999")
    pg.click(f".card[data-prompt-id='{first}'] .run-again")
    second = wait_result(pg, not_id=first)
    assert second != first and pg.input_value("#seed") == str(SEED)  # the run's settings filled into the form
    assert "kinema_00001.mp4" in pg.get_attribute("#download", "href")
    pg.wait_for_function("document.querySelectorAll('#history .card').length === 2", timeout=10_000)

    # The form with one value changed: a new file, new frames.
    pg.fill("#seed", str(SEED + 1))
    pg.click("#generate")
    third = wait_result(pg, not_id=second)
    assert "kinema_00002.mp4" in pg.get_attribute("#download", "href")
    out2 = root / "output" / "kinema_00002.mp4"
    assert read_metadata(out2)["seed"] == SEED + 1 and not (read_video(out2).frames == clip.frames).all()
    pg.wait_for_function("document.querySelectorAll('#history .card').length === 3", timeout=10_000)
    cards = pg.eval_on_selector_all("#history .card", "cs => cs.map(c => c.dataset.promptId)")
    assert cards == [third, second, first]  # newest first

    hist = json.load(urllib.request.urlopen(base + "/history"))
    assert hist[second]["prompt"][2] == hist[first]["prompt"][2]
    cached = [m[1]["nodes"] for m in hist[second]["status"]["messages"] if m[0] == "execution_cached"]
    assert sorted(cached[0]) == ["1", "2", "3"], hist[second]["status"]
    assert pg.errors == []
    pg.evaluate("document.querySelectorAll('.message').forEach(m => m.remove())")
    pg.evaluate("document.getElementById('advanced').open = true")
    pg.wait_for_timeout(300)
    (ROOT / "docs").mkdir(exist_ok=True)
    # the README's screenshot is refreshed only when asked (KINEMA_SCREENSHOT=1): a test run leaves the checkout as it was
    shot = ROOT / "docs" / "web-page.png" if os.environ.get("KINEMA_SCREENSHOT") else tmp_path / "web-page.png"
    pg.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_page_uploads_an_image_and_a_video(page, server):
    import numpy as np
    from PIL import Image

    from kinema.media import save_video

    pg, root = page, server[1]
    rng = np.random.default_rng(1)
    still = root / "first.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(still)
    pg.click("#tasks [data-task=i2v]")
    pg.fill("#prompt", PROMPT)
    pg.fill("#frame_num", "9")
    pg.fill("#steps", "3")
    pg.set_input_files("#file-image", str(still))
    pg.wait_for_function("document.querySelector('.upload[data-for=image] .status').textContent === 'first.png'",
                         timeout=10_000)
    pg.wait_for_function("document.querySelector('.upload[data-for=image] .thumb').naturalWidth === 64",
                         timeout=10_000)  # the upload shown back through /view?type=input
    assert (root / "input" / "first.png").read_bytes() == still.read_bytes()
    before = pg.eval_on_selector("#result-media", "v => v.dataset.promptId")
    pg.click("#generate")
    i2v = wait_result(pg, not_id=before)
    name = pg.eval_on_selector("#download", "a => a.download")
    meta = read_metadata(root / "output" / name)
    assert meta["task"] == "i2v" and meta["frame_num"] == 9
    prompt = json.load(urllib.request.urlopen(server[0] + "/history/" + i2v))[i2v]["prompt"][2]
    assert {"class_type": "LoadImage", "inputs": {"image": "first.png"}} in prompt.values()

    # v2v: a clip uploaded through /upload/image (as VHS's page does) and read by KinemaLoadVideo.
    clip = root / "source.mp4"
    save_video(rng.integers(0, 256, (9, 64, 64, 3), dtype=np.uint8), clip, format="h264-mp4", frame_rate=8)
    pg.click("#tasks [data-task=v2v]")
    assert pg.is_visible("#denoise") and not pg.is_visible(".upload[data-for=image]")
    pg.set_input_files("#file-video", str(clip))
    pg.wait_for_function("document.querySelector('.upload[data-for=video] .status').textContent === 'source.mp4'",
                         timeout=10_000)
    pg.fill("#denoise", "0.5")
    pg.click("#generate")
    v2v = wait_result(pg, not_id=i2v)
    meta = read_metadata(root / "output" / pg.eval_on_selector("#download", "a => a.download"))
    assert meta["task"] == "v2v" and meta["denoise"] == 0.5 and meta["frame_num"] == 9
    prompt = json.load(urllib.request.urlopen(server[0] + "/history/" + v2v))[v2v]["prompt"][2]
    assert any(n["class_type"] == "KinemaLoadVideo" and n["inputs"]["video"] == "source.mp4" for n in prompt.values())

    # extend: a 10-frame clip continued by 8 frames, every frame of it kept (not trimmed to 4n + 1 as for v2v);
    # size and frame count are the video's (their fields hidden)
    ten = root / "ten.mp4"
    save_video(rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8), ten, format="h264-mp4", frame_rate=8)
    pg.click("#tasks [data-task=extend]")
    pg.set_input_files("#file-video", str(ten))
    pg.wait_for_function("document.querySelector('.upload[data-for=video] .status').textContent === 'ten.mp4'",
                         timeout=10_000)
    assert pg.is_visible(".upload[data-for=video]") and pg.is_visible("#extend_frames")
    assert not pg.is_visible("#width") and not pg.is_visible("#frame_num") and not pg.is_visible("#denoise")
    assert pg.eval_on_selector("#colour_match", "s => [...s.options].map(o => o.value)") == ["overlap", "hm", "off"]
    pg.fill("#extend_frames", "8")
    pg.fill("#overlap_frames", "5")
    pg.select_option("#overlap_join", "cut")
    pg.click("#generate")
    ext = wait_result(pg, not_id=v2v)
    name = pg.eval_on_selector("#download", "a => a.download")
    meta = read_metadata(root / "output" / name)
    assert (meta["task"], meta["extend_frames"], meta["overlap_frames"], meta["overlap_join"]) == ("extend", 8, 5, "cut")
    assert read_video(root / "output" / name).frames.shape[0] == 18  # the 10 frames and the 8 new ones
    prompt = json.load(urllib.request.urlopen(server[0] + "/history/" + ext))[ext]["prompt"][2]
    gen = next(n["inputs"] for n in prompt.values() if n["class_type"] == "KinemaGenerate")
    assert (gen["task"], gen["width"], gen["frame_num"], gen["loop"]) == ("extend", 0, 0, False) and "denoise" not in gen
    assert {"class_type": "KinemaLoadVideo", "inputs": {"video": "ten.mp4", "frame_load_cap": 0, "force_4n1": False}} \
        in prompt.values()
    pg.wait_for_function("[...document.querySelectorAll('#history summary')].some(e => e.textContent.startsWith("
                         "'extended by 8 frames (overlap 5), 3 steps'))", timeout=10_000)  # its history card
    pg.click("#tasks [data-task=t2v]")  # back to a task without them: the extend inputs are not sent
    assert pg.evaluate("() => Object.keys(buildPrompt()['2'].inputs).includes('extend_frames')") is False

    # the guidance extras and the upscaler, from the advanced section
    pg.evaluate("() => { document.getElementById('advanced').open = true; }")
    pg.select_option("#upscale", "2")
    pg.fill("#slg", "default")
    pg.fill("#feta", "-1")
    pg.check("#cfg_zero_star")
    pg.click("#generate")
    extras = wait_result(pg, not_id=ext)
    name = pg.eval_on_selector("#download", "a => a.download")
    meta = read_metadata(root / "output" / name)
    assert (meta["upscale"], meta["slg"], meta["feta"], meta["cfg_zero_star"]) == (2, "3", 0.5, True)
    assert read_video(root / "output" / name).frames.shape[1:3] == (128, 128)
    prompt = json.load(urllib.request.urlopen(server[0] + "/history/" + extras))[extras]["prompt"][2]
    gen = next(n["inputs"] for n in prompt.values() if n["class_type"] == "KinemaGenerate")
    assert (gen["upscale"], gen["slg"], gen["feta"], gen["cfg_zero_star"]) == ("2", "default", -1, True)
    pg.evaluate("(s) => fillForm(s)", {**meta, "slg": None})  # a record without an extra: that extra off
    assert pg.input_value("#slg") == "" and pg.input_value("#feta") == "0.5" and pg.is_checked("#cfg_zero_star")
    assert pg.errors == []


def ui_workflow(seed: int) -> dict:
    """A ComfyUI UI-format graph of Kinema's nodes (widgets_values in declaration order, the seed's control
    value after it), as the graph editor saves one."""
    loader = {"id": 10, "type": "KinemaPipelineLoader", "mode": 0, "inputs": [],
              "outputs": [{"name": "pipeline", "type": "KINEMA_PIPELINE", "links": [1]}],
              "widgets_values": ["builtin", "default", "disabled", "auto", 0, "auto", "auto", "auto", "none", 1.0,
                                 "none", 1.0]}
    gen = {"id": 11, "type": "KinemaGenerate", "mode": 0,
           "inputs": [{"name": "pipeline", "type": "KINEMA_PIPELINE", "link": 1}],
           "outputs": [{"name": "frames", "type": "IMAGE", "links": [2]}, {"name": "fps", "type": "FLOAT", "links": []},
                       {"name": "settings", "type": "STRING", "links": [3]}],
           "widgets_values": ["t2i", "a green triangle", "", 64, 64, 1, 2, seed, "fixed", -1.0, 0.0, "euler", "off",
                              "auto", 1.0]}
    save = {"id": 12, "type": "KinemaSaveVideo", "mode": 0,
            "inputs": [{"name": "images", "type": "IMAGE", "link": 2}, {"name": "settings", "type": "STRING", "link": 3}],
            "outputs": [], "widgets_values": [8.0, "png", "ui"]}
    return {"last_node_id": 12, "last_link_id": 3, "nodes": [loader, gen, save],
            "links": [[1, 10, 0, 11, 0, "KINEMA_PIPELINE"], [2, 11, 0, 12, 0, "IMAGE"], [3, 11, 2, 12, 1, "STRING"]],
            "version": 0.4}


def test_page_reports_missing_inputs_and_loads_workflows(page, server):
    pg, root = page, server[1]
    pg.click("#tasks [data-task=flf2v]")
    assert pg.is_visible(".upload[data-for=last_frame]") and not pg.is_visible(".upload[data-for=video]")
    pg.click("#generate")
    pg.wait_for_function("[...document.querySelectorAll('.message.error')].some(m => m.textContent.includes('flf2v "
                         "needs first frame'))", timeout=5_000)

    # An API-format prompt file: offered in a banner, its settings put into the form.
    prompt = {"1": {"class_type": "KinemaPipelineLoader", "inputs": {"ckpt": "builtin", "dtype": "default",
                                                                     "quantization": "disabled", "attention": "auto",
                                                                     "blocks_to_swap": 0}},
              "2": {"class_type": "KinemaGenerate", "inputs": {
                  "pipeline": ["1", 0], "task": "t2i", "prompt": "a blue square", "negative_prompt": "", "width": 64,
                  "height": 64, "frame_num": 1, "steps": 2, "seed": 11, "guide_scale": -1, "shift": 0,
                  "solver": "euler", "cache": "off", "vae_tile": "auto"}},
              "3": {"class_type": "KinemaSaveVideo", "inputs": {"images": ["2", 0], "fps": ["2", 1],
                                                               "settings": ["2", 2], "format": "png",
                                                               "filename_prefix": "loaded"}}}
    path = root / "api.json"
    path.write_text(json.dumps(prompt))
    pg.set_input_files("#load-file", str(path))
    pg.wait_for_selector("#loaded:not([hidden])", timeout=5_000)
    assert "API-format prompt (3 nodes)" in pg.inner_text("#loaded-text")
    assert pg.eval_on_selector("#tasks [aria-selected=true]", "b => b.dataset.task") == "t2i"
    assert pg.input_value("#seed") == "11" and pg.input_value("#solver") == "euler"
    before = pg.eval_on_selector("#result-media", "v => v.dataset.promptId")
    pg.click("#loaded-queue")
    api_run = wait_result(pg, not_id=before)
    assert pg.eval_on_selector("#result-media", "v => v.tagName") == "IMG"
    assert "loaded_00001.png" in pg.get_attribute("#download", "href")
    assert pg.eval_on_selector("#result-media", "v => v.naturalWidth") == 64

    # A UI-format workflow goes to POST /prompt as it is; the server converts it.
    path = root / "ui.json"
    path.write_text(json.dumps(ui_workflow(seed=12)))
    pg.set_input_files("#load-file", str(path))
    pg.wait_for_function("document.getElementById('loaded-text').textContent.includes('UI format')", timeout=5_000)
    pg.click("#loaded-queue")
    wait_result(pg, not_id=api_run)
    assert "ui_00001.png" in pg.get_attribute("#download", "href")
    meta = read_metadata(root / "output" / "ui_00001.png")
    assert meta["seed"] == 12 and meta["prompt"] == "a green triangle" and meta["solver"] == "euler"

    # A Kinema PNG (its text chunk) and a gif / webp sidecar .json give their settings back to the form.
    pg.fill("#seed", "0")
    pg.set_input_files("#load-file", str(root / "output" / "ui_00001.png"))
    pg.wait_for_function("document.getElementById('seed').value === '12'", timeout=5_000)
    assert pg.input_value("#prompt") == "a green triangle"
    sidecar = root / "clip.gif.json"
    sidecar.write_text(json.dumps({**meta, "task": "t2v", "seed": 77, "frame_num": 9, "format": "gif"}))
    pg.set_input_files("#load-file", str(sidecar))
    pg.wait_for_function("document.getElementById('seed').value === '77'", timeout=5_000)
    assert pg.eval_on_selector("#tasks [aria-selected=true]", "b => b.dataset.task") == "t2v"
    assert pg.input_value("#frame_num") == "9" and pg.input_value("#format") == "gif"

    # Stop: POST /interrupt ends a long run part-way, said on the page.
    pg.fill("#steps", "200")
    pg.fill("#frame_num", "17")
    pg.evaluate(WATCH)
    pg.click("#generate")
    pg.wait_for_function("samples.some(([t, v, m]) => m === 200 && v >= 2)", timeout=30_000)
    pg.click("#interrupt")
    pg.wait_for_function("document.getElementById('progress-text').textContent === 'interrupted'", timeout=10_000)
    assert pg.is_visible(".message.info >> text=interrupted")
    assert max(v for _, v, m in pg.evaluate("samples") if m == 200) < 200

    # A broken workflow is refused with a message; the page carries on.
    bad = ui_workflow(seed=13)
    bad["nodes"][1]["type"] = "NoSuchNode"
    path.write_text(json.dumps(bad))
    pg.set_input_files("#load-file", str(path))
    pg.wait_for_selector("#loaded:not([hidden])", timeout=5_000)
    pg.click("#loaded-queue")
    pg.wait_for_function("[...document.querySelectorAll('.message.error')].some(m => m.textContent.includes("
                         "'NoSuchNode'))", timeout=10_000)
    path.write_text("{not json")
    pg.set_input_files("#load-file", str(path))
    pg.wait_for_function("[...document.querySelectorAll('.message.error')].some(m => m.textContent.includes("
                         "'is not valid JSON'))", timeout=5_000)
    assert pg.errors == []


def test_page_with_a_token(browser, tmp_path_factory):
    """A server with --token: the page opened as /?token=T sends it on every request (and the websocket and
    /view); the browser's basic-auth login (the token as password) works as well."""
    gen = serve(tmp_path_factory.mktemp("token"), "--token", "s3cret")
    base, root = next(gen)
    try:
        for n, (url, credentials) in enumerate([(base + "/?token=s3cret", None),
                                                (base + "/", {"username": "me", "password": "s3cret"})]):
            pg = open_page(browser, url, http_credentials=credentials)  # a fresh context: no cookie
            pg.wait_for_function("document.querySelector('#ckpt option[value=builtin]') !== null", timeout=20_000)
            pg.wait_for_function("document.getElementById('connection').textContent === 'connected'", timeout=20_000)
            pg.click("#tasks [data-task=t2i]")
            pg.fill("#prompt", "a white circle")
            pg.fill("#width", "64")
            pg.fill("#height", "64")
            pg.fill("#steps", "2")
            pg.fill("#seed", str(n))
            pg.click("#generate")
            wait_result(pg)
            assert pg.eval_on_selector("#result-media", "v => v.naturalWidth") == 64
            assert pg.get_attribute("#download", "href").endswith("token=s3cret") == (credentials is None)
            assert pg.errors == []
            pg.context.close()
    finally:
        gen.close()
