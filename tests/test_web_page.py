"""The web page at / in a real headless Chromium against a real `kinema serve` on the built-in model: fill the
t2v form, submit, watch the progress bar rise step by step with previews, the <video> play the result (its
duration is frames / fps, its clock advances), load the output file back into the form (its embedded
settings), get a server refusal shown as a message, then "run again" from the history and see a second,
identical result. Writes docs/web-page.png.

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
    root = tmp_path_factory.mktemp("web")
    (root / "models" / "loras").mkdir(parents=True)
    port = free_port()
    kinema = Path(sys.executable).with_name("kinema")
    cmd = [str(kinema) if kinema.exists() else sys.executable, *([] if kinema.exists() else ["-m", "kinema.cli.main"]),
           "serve", "--port", str(port), "--output", str(root / "output"), "--input", str(root / "input"),
           "--models", str(root / "models")]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/system_stats", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"kinema serve did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)
    yield base, root
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def page(request, browser_exe, server):
    from playwright.sync_api import sync_playwright

    exe = browser_exe
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        except Exception as e:  # a browser that cannot start here (no display libraries, ...)
            skip(request, f"{exe} did not start under playwright: {str(e).splitlines()[0]}")
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(server[0] + "/")
        pg.errors = errors
        yield pg
        browser.close()


# Records every change of the progress bar and the preview image, with the page's clock.
WATCH = """() => {
  window.samples = []; window.previews = 0;
  const bar = document.getElementById('progress'), img = document.getElementById('preview');
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


def test_page_runs_t2v_and_run_again(page, server):
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
    pg.screenshot(path=str(ROOT / "docs" / "web-page.png"), full_page=True)


def test_page_reports_missing_inputs_and_loads_a_workflow(page, server):
    pg = page
    pg.click("#tasks [data-task=i2v]")
    assert pg.is_visible(".upload[data-for=image]") and not pg.is_visible(".upload[data-for=video]")
    pg.click("#generate")
    pg.wait_for_function("[...document.querySelectorAll('.message.error')].some(m => m.textContent.includes('i2v "
                         "needs image'))", timeout=5_000)

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
    path = server[1] / "api.json"
    path.write_text(json.dumps(prompt))
    pg.set_input_files("#load-file", str(path))
    pg.wait_for_selector("#loaded:not([hidden])", timeout=5_000)
    assert "API-format prompt (3 nodes)" in pg.inner_text("#loaded-text")
    assert pg.eval_on_selector("#tasks [aria-selected=true]", "b => b.dataset.task") == "t2i"
    assert pg.input_value("#seed") == "11" and pg.input_value("#solver") == "euler"
    before = pg.eval_on_selector("#result-media", "v => v.dataset.promptId")
    pg.click("#loaded-queue")
    wait_result(pg, not_id=before)
    assert pg.eval_on_selector("#result-media", "v => v.tagName") == "IMG"
    assert "loaded_00001.png" in pg.get_attribute("#download", "href")
    assert pg.eval_on_selector("#result-media", "v => v.naturalWidth") == 64
    assert pg.errors == []
