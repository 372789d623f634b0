"""kinema.media when things go wrong: damaged inputs, killed writers, full or unwritable disks, bad options."""

import ast
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import kinema.media
from kinema.errors import KinemaError
from kinema.media import FORMATS, check_save, naming, read_video, save_video

MEDIA = Path(kinema.media.__file__).parent


def rich_clip(f=9, h=32, w=48) -> np.ndarray:
    """Ramps and a moving blob (as in test_media), so codecs emit real I-, P- and B-frames. uint8 [F, H, W, 3]."""
    y, x = np.mgrid[:h, :w].astype(np.float64)
    t = np.arange(f)[:, None, None]
    blob = np.exp(-((x - 4 - 3 * t) ** 2 + (y - h / 2) ** 2) / 18)[..., None]  # [F, H, W, 1]
    ramps = np.stack(np.broadcast_arrays(x * 255 / w, y * 255 / h, 40 + t * 20.0), axis=-1)  # [F, H, W, 3]
    return (ramps * (1 - blob) + np.array([255, 255, 0]) * blob).round().astype(np.uint8)


def _media_imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(kinema.media module imported, whether the import is inside a function) for every import."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("kinema.media."):
                found.append((child.module.rsplit(".", 1)[1], inner))
            elif isinstance(child, ast.ImportFrom) and child.module == "kinema.media":
                found.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.Import):
                found.extend((a.name.rsplit(".", 1)[1], inner) for a in child.names if a.name.startswith("kinema.media."))
            visit(child, inner)

    visit(tree, False)
    return found


def test_media_modules_import_one_way():
    """No module of kinema.media reaches itself through its imports, and none hides an import
    of a sibling inside a function (the usual way to dodge a cycle)."""
    modules = {p.stem for p in MEDIA.glob("*.py")} - {"__init__"}
    graph = {}
    for name in modules:
        imports = _media_imports(ast.parse((MEDIA / f"{name}.py").read_text()))
        hidden = [m for m, in_function in imports if in_function and m in modules]
        assert not hidden, f"kinema/media/{name}.py imports {hidden} inside a function"
        graph[name] = {m for m, _ in imports if m in modules}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in graph[start])

    cyclic = sorted(m for m in modules if reaches(m, m))
    assert not cyclic, f"import cycle through {cyclic}: {graph}"


def test_public_names_still_import():
    from kinema.media import __all__ as names
    from kinema.media.read import IMAGE_SUFFIXES, check_readable, open_container, open_image  # used by kinema.train

    assert {"read_metadata", "save_video", "read_video"} <= set(names)
    assert all(hasattr(kinema.media, n) for n in names)
    assert callable(check_readable) and callable(open_container) and callable(open_image) and ".png" in IMAGE_SUFFIXES


# ---------------------------------------------------------------- truncated and damaged inputs


def _cut(path: Path, fraction: float) -> Path:
    """A copy of `path` keeping the first `fraction` of its bytes: a download or copy that stopped."""
    cut = path.with_name(f"cut{fraction}_{path.name}")
    data = path.read_bytes()
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.97])
@pytest.mark.parametrize("fmt", ["h264-mp4", "h265-mp4", "webm", "prores-mov", "gif"])
def test_truncated_video_is_an_error(tmp_path, fmt, fraction):
    cut = _cut(save_video(rich_clip(17), tmp_path, format=fmt), fraction)
    with pytest.raises(KinemaError) as info:
        read_video(cut)
    message = str(info.value)
    assert str(cut) in message and "truncated" in message, message
    read = re.search(r"only (\d+)(?: of 17)? frames could be read|(no) frames could be read", message)
    assert read, f"the message does not say how many frames could be read: {message}"
    assert read[2] or int(read[1]) < 17


@pytest.mark.parametrize("fmt", ["webm", "h264-mp4"])
def test_quiet_end_is_caught_by_the_declared_length(tmp_path, fmt):
    """Cut where the last frame's bytes begin, FFmpeg decodes the rest without a word; only the
    container's frame count (mp4) or duration (WebM) shows that a frame is missing."""
    import av

    path = save_video(rich_clip(17), tmp_path, format=fmt)
    with av.open(str(path)) as container:
        last = max((p for p in container.demux(video=0) if p.size), key=lambda p: p.pos)
    cut = path.with_name("cut_" + path.name)
    cut.write_bytes(path.read_bytes()[: last.pos])
    with av.open(str(cut)) as container:
        decoded = sum(1 for _ in container.decode(video=0))  # no error raised
    assert decoded < 17
    with pytest.raises(KinemaError, match=rf"{re.escape(str(cut))} is truncated or corrupt: only {decoded} of 17 frames"):
        read_video(cut)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_complete_files_are_never_refused(tmp_path, fmt):
    for n in (1,) if fmt == "png" else (1, 2, 9, 17):
        for fps in (16, 24000 / 1001, 60):
            for hw in ((32, 48), (17, 33)):
                clip = rich_clip(n, *hw)
                path = save_video(clip, tmp_path, format=fmt, frame_rate=fps)
                frames = read_video(path).frames
                assert frames.shape[1:3] == hw
                if fmt not in ("gif", "webp"):  # Pillow folds repeated frames into one
                    assert len(frames) == n, (fmt, n, fps, hw)


def test_short_h265_clips_are_written(tmp_path):
    """libx265 under FFmpeg 8 leaves a 1- or 2-frame clip's dts uninitialised about one time in four,
    and the mp4 muxer refused it; 24 tries would all pass by chance well under 0.1% of the time."""
    for _ in range(6):
        for n in (1, 2):
            for pix_fmt in ("yuv420p", "yuv420p10le"):
                path = save_video(rich_clip(n, 17, 33), tmp_path, format="h265-mp4", frame_rate=24, pix_fmt=pix_fmt)
                assert len(read_video(path).frames) == n


# ---------------------------------------------------------------- every writer option, before any long work


class Frames:
    """Stands for frames that must never be looked at: the option check has to fail first."""

    def __getattr__(self, name):
        raise AssertionError("save_video looked at the frames before checking its options")


REFUSALS = [
    ({"format": "avi"}, "unknown format 'avi'"),
    ({"frame_rate": float("nan")}, "frame_rate nan is not a positive number; Wan2.1 clips play at 16"),
    ({"frame_rate": float("inf")}, "frame_rate inf is not a positive number"),
    ({"frame_rate": 0}, "frame_rate 0 is not a positive number"),
    ({"frame_rate": -16}, "frame_rate -16 is not a positive number"),
    ({"frame_rate": "16"}, "frame_rate '16' is not a positive number"),
    ({"loop_count": -1, "format": "gif"}, "loop_count -1 is not a whole number"),
    ({"loop_count": 1.5, "format": "webp"}, "loop_count 1.5 is not a whole number"),
    ({"loop_count": 70000, "format": "gif"}, "loop_count 70000 is not a whole number in 0..65535"),
    ({"crf": 52}, r"crf 52 is out of range for h264-mp4; use a whole number in 0..51"),
    ({"crf": -1, "format": "h265-mp4"}, r"crf -1 is out of range"),
    ({"crf": 64, "format": "webm"}, r"crf 64 is out of range for webm; use a whole number in 0..63"),
    ({"crf": float("nan")}, r"crf nan is out of range"),
    ({"crf": 18.5}, r"crf 18.5 is out of range"),
    ({"format": "webm", "pix_fmt": "yuv420p10le"}, "pix_fmt 'yuv420p10le' is not supported by libvpx-vp9"),
    ({"pix_fmt": "rgb48"}, "pix_fmt 'rgb48' is not supported by libx264"),
    ({"format": "webp", "quality": 101}, "quality 101 is not a whole number in 0..100"),
    ({"filename_prefix": "runs/fox"}, "filename_prefix 'runs/fox' is not a plain file name"),
    ({"filename_prefix": ".."}, r"filename_prefix '\.\.' is not a plain file name"),
]


@pytest.mark.parametrize("kwargs,message", REFUSALS, ids=[" ".join(f"{k}={v}" for k, v in kw.items()) for kw, _ in REFUSALS])
def test_check_save_refuses_bad_options(tmp_path, kwargs, message):
    with pytest.raises(KinemaError, match=message) as checked:
        check_save(tmp_path, **kwargs)
    with pytest.raises(KinemaError) as saved:
        save_video(Frames(), tmp_path, **kwargs)
    assert str(saved.value) == str(checked.value)  # one implementation
    assert "\n" not in str(checked.value)
    assert list(tmp_path.iterdir()) == []


def test_check_save_refuses_a_missing_codec(tmp_path, monkeypatch):
    import av

    monkeypatch.setattr(av, "codecs_available", set(av.codecs_available) - {"libx265"})
    with pytest.raises(KinemaError, match="'h265-mp4' needs the libx265 encoder"):
        check_save(tmp_path, format="h265-mp4")
    with pytest.raises(KinemaError, match="libx265"):
        save_video(Frames(), tmp_path, format="h265-mp4")


def test_check_save_refuses_bad_explicit_files(tmp_path):
    with pytest.raises(KinemaError, match=rf"{re.escape(str(tmp_path / 'clip.mov'))} ends in \.mov but h264-mp4 writes \.mp4"):
        check_save(tmp_path / "clip.mov")
    (tmp_path / "mine.mp4").write_bytes(b"precious")
    with pytest.raises(KinemaError, match=rf"{re.escape(str(tmp_path / 'mine.mp4'))} already exists.*overwrite=True"):
        check_save(tmp_path / "mine.mp4")
    assert check_save(tmp_path / "mine.mp4", overwrite=True) == tmp_path
    (tmp_path / "anim.gif.json").write_text("{}")
    with pytest.raises(KinemaError, match=rf"{re.escape(str(tmp_path / 'anim.gif.json'))} already exists"):
        check_save(tmp_path / "anim.gif", format="gif")
    with pytest.raises(KinemaError, match="anim.gif.json already exists"):
        save_video(Frames(), tmp_path / "anim.gif", format="gif")
    assert (tmp_path / "mine.mp4").read_bytes() == b"precious"


def test_check_save_creates_the_folder_and_leaves_nothing_in_it(tmp_path):
    assert check_save(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_save(tmp_path / "c" / "clip.webm", format="webm") == tmp_path / "c"
    assert check_save(tmp_path / "d", format="png-sequence", filename_prefix="t2v_fox") == tmp_path / "d"
    assert check_save(tmp_path, frame_rate=24000 / 1001, loop_count=3.0, crf=np.int64(23)) == tmp_path
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "c", "d"]


# ---------------------------------------------------------------- an output place that cannot be written


def _one_line_error(info) -> str:
    """The message of a KinemaError raised `from None`: what the CLI prints, with no traceback chained."""
    assert info.value.__cause__ is None and info.value.__suppress_context__
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_file_in_the_way_of_the_folder(tmp_path):
    """ENOTDIR / EEXIST: `runs` is a file, so no folder can be made under it (root cannot override this)."""
    (tmp_path / "runs").write_text("not a folder")
    for target in (tmp_path / "runs" / "day1", tmp_path / "runs" / "day1" / "clip.mp4", tmp_path / "runs"):
        for call in (lambda t=target: check_save(t), lambda t=target: save_video(rich_clip(2), t)):
            with pytest.raises(KinemaError) as info:
                call()
            message = _one_line_error(info)
            assert f"cannot write {target}" in message and f"{tmp_path / 'runs'} is a file, not a folder" in message
    assert (tmp_path / "runs").read_text() == "not a folder"


def test_permission_denied():
    """EACCES. Root writes anywhere, so as root the check runs in a child that drops to `nobody`
    (in a folder of its own: pytest's tmp_path is closed to other users altogether)."""
    with tempfile.TemporaryDirectory() as base:
        os.chmod(base, 0o755)
        folder = Path(base) / "locked"
        folder.mkdir(mode=0o555)
        _check_permission_denied(folder)


def _check_permission_denied(folder: Path) -> None:
    if os.geteuid() != 0:
        with pytest.raises(KinemaError) as info:
            check_save(folder)
        message = _one_line_error(info)
    else:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only the check, then leave without running pytest's clean-up
            try:
                os.setgid(65534)
                os.setuid(65534)
                check_save(folder)
                os.write(write, b"no error")
            except Exception as e:  # noqa: BLE001 -- whatever it is, the parent must hear of it
                os.write(write, (str(e) if isinstance(e, KinemaError) else repr(e)).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read) as pipe:
            message = pipe.read()
    assert message.startswith(f"cannot write {folder}") and "permission denied" in message, message


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 KiB tmpfs of our own: a real full disk, and a real read-only file system."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=64k,{options}", "tmpfs", str(point)],
                              check=False, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root in a privileged container): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_read_only_file_system(tmpfs):
    folder = tmpfs("ro")
    for call in (lambda: check_save(folder / "clips"), lambda: check_save(folder), lambda: save_video(rich_clip(2), folder)):
        with pytest.raises(KinemaError) as info:
            call()
        message = _one_line_error(info)
        assert message.startswith(f"cannot write {folder}") and "read-only file system" in message, message


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_full_disk(tmpfs, fmt):
    """ENOSPC from a real full disk, in every writer: one line naming the place, and nothing left behind."""
    folder = tmpfs("rw")
    (folder / "filler").write_bytes(b"x" * 60_000)  # leaves a few KiB: the folder is writable, the clip does not fit
    frames = np.random.default_rng(0).integers(0, 256, (1 if fmt == "png" else 8, 64, 96, 3), dtype=np.uint8)
    assert check_save(folder, format=fmt) == folder  # an empty probe file still fits
    with pytest.raises(KinemaError) as info:
        save_video(frames, folder, format=fmt, metadata={"seed": 1})
    message = _one_line_error(info)
    assert message.startswith(f"cannot write {folder}") and "disk is full" in message, message
    assert [p.name for p in folder.iterdir()] == ["filler"]


# ---------------------------------------------------------------- leftovers of writers that were killed


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    return child.pid


def test_stale_partials_of_dead_writers_are_removed(tmp_path):
    dead = _dead_pid()
    stale_file = tmp_path / f".kinema.mp4.partial-{dead}-{naming.HOST}-0badc0de"
    stale_dir = tmp_path / f".kinema.frames.partial-{dead}-{naming.HOST}-0badc0df"
    stale_file.write_bytes(b"half a video")
    stale_dir.mkdir()
    (stale_dir / "frame_00001.png").write_bytes(b"x")
    live = tmp_path / f".kinema.mp4.partial-{os.getpid()}-{naming.HOST}-00c0ffee"  # a writer still running
    other_host = tmp_path / f".kinema.mp4.partial-{dead}-{'0' * 8 if naming.HOST != '0' * 8 else '1' * 8}-00c0ffee"
    foreign = tmp_path / ".notes.txt.partial-abc"  # not a name Kinema makes
    for p in (live, other_host, foreign):
        p.write_bytes(b"in progress")
    path = save_video(rich_clip(2), tmp_path)
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other_host.exists() and foreign.exists()
    assert path.name == "kinema_00001.mp4"


WRITER = """
import sys, time
import numpy as np
from kinema.media import save_video, write

original, calls = write._write_png, [0]

def slow(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:  # two frames are in the partial folder: say so, then hang until killed
        print("writing", flush=True)
        time.sleep(60)
    return original(*args, **kwargs)

write._write_png = slow
save_video(np.zeros((8, 32, 48, 3), np.uint8), sys.argv[1], format="png-sequence")
"""


def test_a_writer_killed_mid_write_is_cleaned_up_by_the_next(tmp_path):
    """SIGKILL skips every `finally`: the killed writer's partial file stays until the next write here."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(kinema.media.__file__).parents[2])
    try:
        assert writer.stdout.readline().strip() == "writing"
        partials = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
        assert len(partials) == 1 and f".partial-{writer.pid}-" in partials[0].name
        save_video(rich_clip(2), tmp_path)  # the writer is alive: its file must stay
        assert partials[0].exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert partials[0].exists()  # what SIGKILL leaves behind
    assert save_video(rich_clip(2), tmp_path).name == "kinema_00002.mp4"
    assert not partials[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kinema_00001.mp4", "kinema_00002.mp4"]
