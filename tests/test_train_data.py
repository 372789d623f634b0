"""Training data for real videos: caption files, validation, the clip dataset and bucketing."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from kinema.errors import KinemaError
from kinema.media import save_video
from kinema.toy import world
from kinema.train.buckets import BucketBatchSampler, aspect_buckets, nearest_bucket, token_bucket
from kinema.train.videos import CaptionedVideo, VideoClips, read_captions, validate

FRAMES = 25
# name, width, height
CLIPS = [("a.mp4", 64, 64), ("b.mp4", 96, 64), ("c.mp4", 64, 96), ("d.mp4", 64, 64), ("e.gif", 96, 64), ("f.gif", 64, 96)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder of 6 world clips with captions.json, captions.csv and .txt sidecars; the rendered frames."""
    root = tmp_path_factory.mktemp("videos")
    rendered, rows = {}, []
    for i, (name, w, h) in enumerate(CLIPS):
        spec = world.random_spec(world.clip_rng(0, i), w, h)
        frames = world.render(spec, w, h, FRAMES)
        save_video(frames, root / name, format="gif" if name.endswith(".gif") else "h264-mp4",
                   frame_rate=world.FPS, crf=10)
        (root / name).with_suffix(".txt").write_text(spec.caption + "\n")
        rendered[name] = frames
        rows.append({"file": name, "text": spec.caption})
    (root / "captions.json").write_text(json.dumps(rows))
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["video", "caption"])
        writer.writeheader()
        writer.writerows({"video": r["file"], "caption": r["text"]} for r in rows)
    (root / "mapping.json").write_text(json.dumps({r["file"]: r["text"] for r in rows}))
    sidecars = root / "sidecars"
    sidecars.mkdir()
    for name, _, _ in CLIPS:
        for p in (root / name, (root / name).with_suffix(".txt")):
            shutil.copy(p, sidecars / p.name)
    return root, rendered, rows


def pairs(items):
    return sorted((it.path.name, it.caption) for it in items)


def test_read_all_formats(data):
    root, _, rows = data
    expected = sorted((r["file"], r["text"]) for r in rows)
    for source in (root / "captions.json", root / "captions.csv", root / "mapping.json", root, root / "sidecars"):
        items = read_captions(source)
        assert pairs(items) == expected, source
        assert all(it.path.is_file() for it in items)
    items = validate(root)
    assert [(it.path.name, it.info.width, it.info.height, it.info.frames) for it in items] == [
        (n, w, h, FRAMES) for n, w, h in CLIPS]


def test_absolute_paths_and_metadata_name(data, tmp_path):
    root, _, _ = data
    (tmp_path / "metadata.json").write_text(json.dumps([{"file_path": str(root / "a.mp4"), "prompt": "p"}]))
    assert [(it.path, it.caption) for it in read_captions(tmp_path)] == [(root / "a.mp4", "p")]


def error(source, **kw) -> str:
    with pytest.raises(KinemaError) as e:
        validate(source, **kw)
    return str(e.value)


def test_validate_missing_and_unreadable_videos(data, tmp_path):
    root, _, _ = data
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video" * 50)
    rows = [{"file": str(root / "a.mp4"), "text": "ok"}, {"file": "nope.mp4", "text": "missing"},
            {"file": "garbage.mp4", "text": "corrupt"}]
    (tmp_path / "captions.json").write_text(json.dumps(rows))
    msg = error(tmp_path)
    assert msg.startswith("2 problems")
    assert "nope.mp4" in msg and "captions.json item 1" in msg
    assert "garbage.mp4" in msg and "not a readable video" in msg
    # without probing, only the missing file is found
    assert error(tmp_path, probe=False).startswith("1 problem")


def test_validate_empty_and_missing(tmp_path):
    assert "holds no videos" in error(tmp_path)
    assert "does not exist" in error(tmp_path / "captions.json")
    assert "empty" in error([])
    (tmp_path / "captions.json").write_text("[]")
    assert "lists no videos" in error(tmp_path / "captions.json")


def test_validate_bad_files(tmp_path):
    (tmp_path / "captions.json").write_text('[{"file": "a.mp4", "text": "x"},\n {"file": "b.mp4" "text": "y"}]')
    msg = error(tmp_path / "captions.json")
    assert "not valid JSON" in msg and "line 2" in msg and "column" in msg
    bad_csv = tmp_path / "c.csv"
    bad_csv.write_text("file,description\na.mp4,a clip\n")
    msg = error(bad_csv)
    assert "no caption column" in msg and "description" in msg
    bad_csv.write_text('file,text\n"a.mp4,unterminated\n')
    assert "not valid CSV" in error(bad_csv) and "line 2" in error(bad_csv)
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"file": "a.mp4"}, {"text": "no file"}, "a.mp4"]))
    msg = error(rows)
    assert msg.startswith("3 problems") and "item 0 (a.mp4) has no caption" in msg and "item 1 has no file" in msg
    (tmp_path / "clip.mp4").write_bytes(b"x")
    side = tmp_path / "side"
    side.mkdir()
    shutil.copy(tmp_path / "clip.mp4", side / "clip.mp4")
    assert "clip.txt is missing" in error(side)


def test_validate_min_frames(data, tmp_path):
    root, _, _ = data
    assert len(validate(root, min_frames=FRAMES)) == 6
    msg = error(root, min_frames=33)
    assert msg.startswith("6 problems") and f"a.mp4 has {FRAMES} frames, fewer than the 33" in msg
    save_video(np.zeros((1, 32, 48, 3), np.uint8), tmp_path / "still.png", format="png")
    items = validate([CaptionedVideo(tmp_path / "still.png", "a still")], min_frames=33)  # stills are exempt
    assert items[0].info.frames == 1


def test_clips_shapes_and_range(data):
    root, _, rows = data
    captions = {r["file"]: r["text"] for r in rows}
    ds = VideoClips(root, num_frames=9, stride=2, base_area=64 * 64, seed=3)
    buckets = aspect_buckets(64 * 64)
    for i, (name, w, h) in enumerate(CLIPS):
        bw, bh = nearest_bucket(w, h, buckets)
        sample = ds[i]
        assert sample["video"].shape == (3, 9, bh, bw) and sample["video"].dtype == torch.float32
        assert sample["video"].min() >= -1 and sample["video"].max() <= 1
        assert sample["path"].endswith(name) and sample["caption"] == captions[name]
    assert {ds.sizes[i] for i in range(6)} == {(64, 64), (80, 48), (48, 80)}
    assert ds.bucket_keys()[1] == (9, 80, 48)


def test_clips_content_and_determinism(data):
    root, rendered, _ = data
    native = [(64, 64), (96, 64), (64, 96)]
    ds = VideoClips(root, num_frames=5, stride=3, buckets=native, seed=7)
    for i, (name, _, _) in enumerate(CLIPS):
        idx = ds.frame_indices(i)
        assert np.diff(idx).tolist() == [3] * 4 and 0 <= idx[0] <= FRAMES - 13
        src = world.to_tensor(rendered[name][idx])
        err = (ds[i]["video"] - src).abs()
        assert err.mean() < (0.002 if name.endswith(".gif") else 0.02), name  # gif is exact, h264 close
    starts = {e: [ds.frame_indices(i, e)[0] for i in range(6)] for e in range(4)}
    assert len({tuple(s) for s in starts.values()}) > 1  # epochs draw new starts
    again = VideoClips(root, num_frames=5, stride=3, buckets=native, seed=7)
    again.set_epoch(2)
    ds.set_epoch(2)
    assert torch.equal(ds[4]["video"], again[4]["video"]) and ds.frame_indices(4) == again.frame_indices(4)
    by_fps = VideoClips(root, num_frames=5, fps=world.FPS / 2, buckets=native)
    assert np.diff(by_fps.frame_indices(0)).tolist() == [2] * 4
    squeezed = VideoClips(root, num_frames=9, stride=5, buckets=native)  # 41 > 25 frames: step shrinks to 3
    assert squeezed.frame_indices(0) == list(range(0, 25, 3))


def test_clips_resized_mean_colour(data):
    root, rendered, _ = data
    ds = VideoClips(root, num_frames=5, base_area=32 * 32, seed=1)  # downscaled 2x: antialiased
    for i, (name, _, _) in enumerate(CLIPS[:3]):
        video = ds[i]["video"]
        src = world.to_tensor(rendered[name][ds.frame_indices(i)])
        assert (video.mean(dim=(1, 2, 3)) - src.mean(dim=(1, 2, 3))).abs().max() < 0.08, name


def test_clips_stills_and_short_videos(tmp_path):
    save_video(np.full((1, 48, 32, 3), 200, np.uint8), tmp_path / "still.png", format="png")
    short = np.arange(7, dtype=np.uint8)[:, None, None, None].repeat(32, 1).repeat(32, 2).repeat(3, 3) * 30
    save_video(short, tmp_path / "short.gif", format="gif")  # distinct frames: gif folds repeats
    (tmp_path / "still.txt").write_text("a still")
    (tmp_path / "short.txt").write_text("a short clip")
    ds = VideoClips(tmp_path, num_frames=17, buckets=[(32, 48), (32, 32)])
    assert [ds[i]["video"].shape for i in range(2)] == [(3, 5, 32, 32), (3, 1, 48, 32)]
    assert ds.frames == [5, 1]
    # the short clip: 5 consecutive frames of the 7, as they were (gif is exact for these greys, no resize)
    idx = ds.frame_indices(0)
    assert np.diff(idx).tolist() == [1] * 4 and 0 <= idx[0] <= 2
    assert torch.equal(ds[0]["video"], world.to_tensor(short[idx]))
    torch.testing.assert_close(ds[1]["video"], torch.full((3, 1, 48, 32), 200 / 127.5 - 1))
    assert [ds[i]["caption"] for i in range(2)] == ["a short clip", "a still"]
    with pytest.raises(KinemaError, match="4n\\+1"):
        VideoClips(tmp_path, num_frames=16)


class WordTokenizer:
    def token_ids(self, text: str) -> list[int]:
        return list(range(len(text.split()) + 1))


def test_token_buckets_and_loader(data):
    root, _, _ = data
    ds = VideoClips(root, num_frames=5, base_area=64 * 64)
    keys = ds.bucket_keys(WordTokenizer(), token_multiple=8)
    assert all(k[3] == token_bucket(len(it.caption.split()) + 1, 8) and k[3] % 8 == 0 for k, it in zip(keys, ds.items))
    assert token_bucket(8) == 8 and token_bucket(9) == 16 and token_bucket(1, 4) == 4
    sampler = BucketBatchSampler(ds.bucket_keys(), batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    batches = list(loader)
    assert len(batches) == len(sampler) == 3  # 2 per bucket
    for b in batches:
        assert b["video"].shape[:3] == (2, 3, 5) and len(b["caption"]) == 2
    # each batch holds the clips the sampler chose (a fresh sampler of the same seed chooses the same)
    chosen = list(BucketBatchSampler(ds.bucket_keys(), batch_size=2, seed=0))
    assert sorted(i for idx in chosen for i in idx) == list(range(6))
    for b, idx in zip(batches, chosen):
        assert len({ds.bucket_keys()[i] for i in idx}) == 1
        assert torch.equal(b["video"], torch.stack([ds[i]["video"] for i in idx]))
        assert list(b["caption"]) == [ds.items[i].caption for i in idx]


def test_aspect_buckets():
    for area in (64 * 64, 512 * 512):
        buckets = aspect_buckets(area)
        ratios = [w / h for w, h in buckets]
        assert all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
        assert all(0.7 * area <= w * h <= 1.3 * area for w, h in buckets)
        assert min(ratios) <= 1 / 2.9 and max(ratios) >= 2.9 and ratios == sorted(ratios)
    assert nearest_bucket(1920, 1080, aspect_buckets(512 * 512)) == (688, 384)
    assert nearest_bucket(100, 100, aspect_buckets(512 * 512)) == (512, 512)
    assert aspect_buckets(256 * 256, multiple=32) == sorted(aspect_buckets(256 * 256, 32), key=lambda s: s[0] / s[1])


KEYS = [(17, 64, 64, 8)] * 11 + [(17, 80, 48, 8)] * 7 + [(1, 64, 64, 16)] * 5 + [(17, 64, 64, 16)] * 2


def test_sampler_batches():
    sampler = BucketBatchSampler(KEYS, batch_size=3, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 1 + 0
    assert all(len(b) == 3 and len({KEYS[i] for i in b}) == 1 for b in batches)
    seen = Counter(i for b in batches for i in b)
    assert max(seen.values()) == 1 and len(seen) == 18  # 2 + 1 + 2 + 2 dropped
    assert {KEYS[i] for i in set(range(len(KEYS))) - set(seen)} <= set(KEYS)
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 0
    second = list(sampler)
    assert second != batches and sorted(map(sorted, second)) != sorted(map(sorted, batches))
    full = list(BucketBatchSampler(KEYS, batch_size=3, seed=5, drop_last=False))
    assert sorted(i for b in full for i in b) == list(range(len(KEYS))) and len(full) == 4 + 3 + 2 + 1
    assert all(len({KEYS[i] for i in b}) == 1 for b in full)


def test_sampler_determinism_and_resume():
    a, b = BucketBatchSampler(KEYS, 2, seed=11), BucketBatchSampler(KEYS, 2, seed=11)
    run = [list(a) for _ in range(3)]
    assert run == [list(b) for _ in range(3)]
    assert run[0] != list(BucketBatchSampler(KEYS, 2, seed=12))
    for k in (0, 4, len(a) - 1, len(a)):
        s = BucketBatchSampler(KEYS, 2, seed=11)
        s.set_epoch(1)
        it = iter(s)
        head = [next(it) for _ in range(k)]
        state = s.state_dict()
        resumed = BucketBatchSampler(KEYS, 2, seed=11)
        resumed.load_state_dict(state)
        resumed.set_epoch(state["epoch"])  # a resumed loop calling set_epoch keeps its place
        tail = list(resumed) if k < len(a) else []
        assert head + tail == run[1], k
        assert resumed.state_dict()["epoch"] == 2 and list(resumed) == run[2]
    with pytest.raises(KinemaError, match="batch_size 2 -> 3"):
        BucketBatchSampler(KEYS, 3, seed=11).load_state_dict(a.state_dict())
