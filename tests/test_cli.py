"""`kinema generate` / `kinema info` end to end on a random checkpoint in the official folder layout."""

import shutil
import subprocess
import sys

import av
import numpy as np
import pytest

from kinema.cli.main import main
from kinema.demo import write_random_checkpoint
from kinema.media import read_video

PROMPT = "a red circle moving right on a black background"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "Wan2.1-T2V-tiny"
    write_random_checkpoint(folder)
    return folder


def _gen(ckpt, *extra, task="t2v-1.3B"):
    return ["generate", "--task", task, "--ckpt_dir", str(ckpt), "--size", "64*48", "--frame_num", "5",
            "--sample_steps", "2", "--prompt", PROMPT, "--base_seed", "11", *extra]


def _decode(path):
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


def test_generate_info_and_repeat(ckpt, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert main(_gen(ckpt, "--save_file", str(out), "--fps", "12")) == 0
    frames, fps = _decode(out)
    assert frames.shape == (5, 48, 64, 3) and fps == 12
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert '"seed": 11' in info and PROMPT in info and '"solver": "unipc"' in info
    again = tmp_path / "again.mp4"
    assert main(["generate", "--from", str(out), "--ckpt_dir", str(ckpt), "--save_file", str(again)]) == 0
    frames2, fps2 = _decode(again)
    assert fps2 == 12 and np.abs(frames.astype(int) - frames2).mean() < 1.0  # libx264 is not bit-reproducible
    # exactly the same frames: the repeat and a direct run written losslessly (webp)
    direct, repeat = tmp_path / "direct.webp", tmp_path / "repeat.webp"
    assert main(_gen(ckpt, "--save_file", str(direct), "--fps", "12", "--lossless")) == 0
    assert main(["generate", "--from", str(out), "--ckpt_dir", str(ckpt), "--save_file", str(repeat), "--format", "webp",
                 "--lossless"]) == 0
    assert np.array_equal(read_video(direct).frames, read_video(repeat).frames)


def test_default_name_and_prefix_counter(ckpt, tmp_path):
    assert main(_gen(ckpt, "--output_dir", str(tmp_path))) == 0
    (name,) = [p.name for p in tmp_path.iterdir()]
    assert name.startswith("t2v-1.3B_64*48_1_1_a_red_circle_moving_right_on_a_black_bac") and name.endswith(".mp4")
    for _ in range(2):
        assert main(_gen(ckpt, "--output_dir", str(tmp_path), "--filename_prefix", "run", "--format", "webp", "--lossless")) == 0
    assert (tmp_path / "run_00001.webp").exists() and (tmp_path / "run_00002.webp").exists()
    assert main(_gen(ckpt, "--save_file", str(tmp_path / "pp.gif"), "--pingpong", "--loop_count", "3")) == 0
    from PIL import Image

    with Image.open(tmp_path / "pp.gif") as im:
        assert im.info["loop"] == 3 and im.n_frames == 8  # 5 frames pingponged: 2 * 5 - 2


def test_t2i_writes_png(ckpt, tmp_path):
    import kinema
    from kinema.media import read_image

    assert main(_gen(ckpt, "--save_file", str(tmp_path / "img.png"), task="t2i-14B")) == 0
    got = read_image(tmp_path / "img.png").numpy()
    want = kinema.Pipeline.load(ckpt)(PROMPT, task="t2i", size="64*48", steps=2, seed=11, progress=False).frames[0]
    assert got.shape == (48, 64, 3) and np.array_equal(got, want)  # the lossless still is the API's frame


def _err(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    return code, err


def test_user_errors_exit_2(ckpt, image_ckpts, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(ckpt / "diffusion_pytorch_model.safetensors", partial)
    existing = tmp_path / "exists.mp4"
    existing.write_bytes(b"keep me")
    cases = [
        (_gen(ckpt, "--size", "64x"), "--size '64x' is not W*H"),
        ([a for a in _gen(ckpt) if a not in ("--prompt", PROMPT)], "--prompt is missing"),
        (_gen(ckpt, "--task", "i2v-14B"), "task i2v-14B needs a i2v DiT, but the checkpoint is a t2v model"),
        (_gen(image_ckpts / "i2v", "--task", "i2v-14B"), "needs --image"),
        (_gen(ckpt, "--image", str(tmp_path / "notes.png")), "--image is not used by task t2v-1.3B; use task i2v-14B"),
        (_gen(image_ckpts / "i2v", "--task", "i2v-14B", "--image", str(tmp_path / "missing.png")), "missing.png does not exist"),
        (_gen(ckpt, "--frame_num", "0"), "--frame_num 0 must be a whole number from 1 to 1025"),
        (_gen(ckpt, "--size", "99999*99999"), "--size 99999*99999 is too large"),
        (_gen(ckpt, "--sample_guide_scale", "nan"), "--sample_guide_scale nan is not a finite number"),
        (_gen(ckpt, "--sample_steps", "0"), "--sample_steps 0 must be a whole number"),
        (_gen(ckpt, "--base_seed", "-5"), "--base_seed -5 must be a whole number"),
        (_gen(ckpt, "--denoise", "0"), "--denoise 0.0 is out of range"),
        (_gen(image_ckpts / "flf2v", "--task", "flf2v-14B", "--first_frame", str(image_ckpts / "first.png")),
         "needs --last_frame"),
        (_gen(partial), "umT5"),
        (_gen(ckpt, "--save_file", str(existing)), "already exists and Kinema never overwrites a file: give --save_file another name"),
        (["info", str(tmp_path / "nothing.mp4")], "does not exist"),
    ]
    for args, message in cases:
        code, err = _err(args, capsys)
        assert code == 2, (args, err)
        assert err.startswith("kinema: error:") and message in err, (message, err)
    assert existing.read_bytes() == b"keep me"


def test_unreadable_image_is_a_clear_error(image_ckpts, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("not an image")
    code, err = _err(_gen(image_ckpts / "i2v", "--task", "i2v-14B", "--image", str(tmp_path / "bad.png")), capsys)
    assert code == 2 and "bad.png" in err


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "kinema.cli.main", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for flag in ["--task", "--size", "--frame_num", "--ckpt_dir", "--offload_model", "--t5_cpu", "--sample_solver",
                 "--sample_steps", "--sample_shift", "--sample_guide_scale", "--base_seed", "--image", "--first_frame",
                 "--last_frame", "--prompt", "--save_file", "--negative_prompt", "--video", "--denoise", "--fps",
                 "--format", "--output_dir", "--filename_prefix", "--crf", "--pix_fmt", "--loop_count", "--pingpong", "--dit", "--vae", "--t5", "--tokenizer", "--clip"]:
        assert flag in text, flag
    assert "(default: t2v-14B)" in text and "the model's own, else 1280*720" in text and "default unipc" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_bad_flag_value_exits_2():
    out = subprocess.run([sys.executable, "-m", "kinema.cli.main", "generate", "--sample_steps", "many"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def image_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgckpt")
    for model_type in ("i2v", "flf2v"):
        write_random_checkpoint(root / model_type, model_type=model_type)
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(root / "first.png")
    Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(root / "last.png")
    return root


@pytest.mark.parametrize("task,frames", [("i2v-14B", 9), ("flf2v-14B", 13)])
def test_image_tasks_end_to_end(image_ckpts, tmp_path, task, frames):
    kind = task.split("-")[0]
    images = ["--image", str(image_ckpts / "first.png")] if kind == "i2v" else [
        "--first_frame", str(image_ckpts / "first.png"), "--last_frame", str(image_ckpts / "last.png")]
    out = tmp_path / f"{kind}.webp"
    args = _gen(image_ckpts / kind, "--frame_num", str(frames), "--save_file", str(out), "--lossless", *images, task=task)
    assert main(args) == 0
    from kinema.media import read_video

    decoded = read_video(out).frames.numpy()
    # Official rule: the 60x90 image's aspect at <= 64*48 pixels, in whole 16-pixel patches:
    # lat_h = sqrt(3072 * 2/3) // 8 // 2 * 2 = 4, lat_w = sqrt(3072 * 3/2) // 8 // 2 * 2 = 8.
    assert decoded.shape == (frames, 32, 64, 3)
    import kinema

    inputs = {"image": image_ckpts / "first.png"} if kind == "i2v" else {
        "first_frame": image_ckpts / "first.png", "last_frame": image_ckpts / "last.png"}
    want = kinema.Pipeline.load(image_ckpts / kind)(PROMPT, task=kind, size="64*48", frame_num=frames, steps=2, seed=11,
                                                     progress=False, **inputs).frames
    assert np.array_equal(decoded, want)  # lossless webp: exactly the API's frames


def test_v2v_end_to_end(ckpt, tmp_path):
    src = tmp_path / "src.mp4"
    assert main(_gen(ckpt, "--save_file", str(src), "--frame_num", "9")) == 0
    out = tmp_path / "v2v.webm"
    assert main(_gen(ckpt, "--video", str(src), "--denoise", "0.5", "--frame_num", "9", "--save_file", str(out), task="v2v")) == 0
    decoded, _ = _decode(out)
    assert decoded.shape == (9, 48, 64, 3)
    from kinema.media import read_metadata

    assert read_metadata(out)["denoise"] == 0.5 and read_metadata(out)["task"] == "v2v"


def test_repeat_keeps_vae_tiles(ckpt, tmp_path, capsys):
    """--vae_tile changes the pixels slightly, so it is recorded and `--from` repeats it."""
    out = tmp_path / "tiled.webp"  # lossless webp: exact frames (libx264's are not reproducible run to run)
    assert main(_gen(ckpt, "--save_file", str(out), "--vae_tile", "256x256", "--lossless")) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert '"vae_tile": "256x256"' in capsys.readouterr().out
    again = tmp_path / "again.webp"
    assert main(["generate", "--from", str(out), "--ckpt_dir", str(ckpt), "--save_file", str(again), "--lossless"]) == 0
    assert np.array_equal(read_video(out).frames, read_video(again).frames)


def test_cli_equals_the_api(tmp_path):
    """The same job through `kinema generate --format png-sequence` and through kinema.Pipeline: the same frames."""
    import kinema
    from kinema.media import read_video

    assert main(["generate", "--prompt", PROMPT, "--base_seed", "5", "--format", "png-sequence", "--output_dir",
                 str(tmp_path), "--filename_prefix", "run"]) == 0
    frames = read_video(tmp_path / "run_00001").frames.numpy()
    result = kinema.Pipeline.load()(PROMPT, seed=5, progress=False)  # both: the built-in model with its defaults
    assert frames.shape == (17, 64, 64, 3) and np.array_equal(frames, result.frames)


def test_writer_and_output_errors_come_before_any_model_loads(ckpt, tmp_path, capsys, caplog):
    """A bad --fps or an output place that cannot be written is refused before loading, not after sampling."""
    import logging

    (tmp_path / "afile").write_text("in the way")
    src = tmp_path / "src.mp4"
    assert main(_gen(ckpt, "--save_file", str(src), "--frame_num", "9")) == 0
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    cases = [
        (_gen(ckpt, "--fps", "-4", "--save_file", str(tmp_path / "a.mp4")), "-4"),
        (_gen(ckpt, "--fps", "nan", "--save_file", str(tmp_path / "a.mp4")), "nan"),
        (_gen(ckpt, "--crf", "99", "--save_file", str(tmp_path / "a.mp4")), "crf 99"),
        (_gen(ckpt, "--save_file", str(tmp_path / "afile" / "sub" / "a.mp4")), "afile"),
        (_gen(ckpt, "--save_file", str(tmp_path / "a.mov"), "--format", "gif"), "a.mov"),
        (_gen(ckpt, "--video", str(cut), "--save_file", str(tmp_path / "v.mp4"), task="v2v"), "truncated"),
    ]
    for args, message in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kinema"):
            code, err = _err(args, capsys)
        assert code == 2 and err.startswith("kinema: error:") and message in err, (args, err)
        assert "Loading models" not in caplog.text, args  # refused before any weight was read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "cut.mp4", "src.mp4"]  # nothing written, no .partial


def test_official_name_for_a_png_sequence(ckpt, tmp_path):
    """Without --save_file a PNG sequence is a numbered folder named like the official file (no trailing dot)."""
    from kinema.media import read_video

    assert main(_gen(ckpt, "--format", "png-sequence", "--output_dir", str(tmp_path))) == 0
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert folder.name.startswith("t2v-1.3B_64*48_1_1_a_red_circle") and folder.name.endswith("_00001")
    assert read_video(folder).frames.shape == (5, 48, 64, 3)
