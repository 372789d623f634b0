"""Long video on the built-in model: seams and drift with context windows and with extension, against one pass.

For a few world prompts (the eval seed, not used in training) it generates a long t2v (default 161 frames) twice:
in one pass (the baseline; the built-in DiT takes 41 latent frames at 64x64 easily) and with context windows (by
default the model's own: 17 frames, overlap 16, the uniform_standard schedule); and a 17-frame clip extended three
times by 32 frames (task extend, overlap 9; its seams are the joins), with the defaults (`extend`: the model's
own windows where it declares some, the colour shifted by the overlap's offset, the overlap cross-faded into the new clip's), joined by a cut after the input
frames (`extend cut`), and with each frame's histogram matched to the overlap's (`extend hm`); more words after
`extend` combine: `windows` samples each continuation with the context windows above (what a model that declares
windows does by default: the built-in one), `onepass` in one pass (`context_windows=False`), `truth` continues the
world's own 17-frame render instead of a generated clip (a real video to extend). Two more rows give
the floor of each measure: `truth`, the world's own render of the prompt's clip over the same frames (its motion
spread over 161 frames: a still-looking object, moving a tenth of its 17-frame speed), and `truth vae`, that render
through the VAE and back. For each video, from the world analyser:

- followed: the share of frames where exactly one object is found (the analyser follows one object);
- seam ratio: the largest frame-to-frame centroid jump at a window boundary (the first pixel frame of each
  static window's first latent frame and of the latent frame after its last) over the median jump elsewhere;
  the issue's bound is 1.5; also the mean jump at the boundaries over that median (one noisy pair of frames
  decides the largest; the one-pass video, measured at the same frames, gives the floor of both). Each on the
  analyser's track (whole-pixel mask centroids) and on sub-pixel (coverage-weighted) centroids, and the largest
  over the median jump into the other latent frames (the VAE's own seams, where every window starts);
- background drift: the largest deviation of a frame's background (border median, any channel) from the
  video's mean, in 0-255 levels (bound 3); object colour drift: the largest deviation of a frame's object
  colour (the median of its interior, as the analyser measures colour) from the video's median (bound 6).

    .venv/bin/python bench/long_video.py [--frames 161] [--window 17] [--overlap 16] [--prompts 6] [--ckpt_dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import kinema
from kinema.toy import world
from kinema.toy.analyse import analyse, coverage_alpha
from kinema.toy.evaluate import _specs, to_uint8
from kinema.pipeline.job import parse_windows
from kinema.sampling.windows import windows_for


def soft_track(frames: np.ndarray, a) -> list[tuple[float, float] | None]:
    """Sub-pixel centroids: each pixel weighted by its coverage alpha (its colour projected on the frame's
    background -> the object's colour, clipped to [0, 1], under 0.1 dropped), where the analyser found the object.
    The analyser's own track is the mean of a thresholded mask: a 6-12 pixel object moving 0.2-0.6 pixels a frame
    moves it in whole-pixel steps, so its frame-to-frame jumps are mostly rounding."""
    if a.color_rgb is None:
        return [None] * len(frames)
    x = frames.astype(np.float32)
    h, w = x.shape[1:3]
    ys, xs = np.mgrid[0:h, 0:w]
    out = []
    for i, bg in enumerate(a.frame_backgrounds):
        if not a.present[i]:
            out.append(None)
            continue
        alpha = coverage_alpha(x[i], np.array(bg, np.float32), np.array(a.color_rgb, np.float32))
        if alpha is None:
            out.append(None)
            continue
        alpha = alpha.clip(0, 1)
        alpha[alpha < 0.1] = 0
        m = alpha.sum()
        out.append((float((alpha * xs).sum() / m) + 0.5, float((alpha * ys).sum() / m) + 0.5) if m > 0 else None)
    return out


def seam_ratios(track, boundaries: list[int]) -> dict:
    """Jumps j[i] = |c[i+1] - c[i]|. At the boundaries (pixel frame b: the jump from b-1 into b): the largest and
    the mean over the median jump elsewhere (the issue's ratio), and the largest over the median jump at the other
    latent-frame starts (pixel frames 4k+1: the VAE decodes each latent frame's 4 frames together, so the jumps into
    a latent frame run larger than those inside one, and a window always starts at one)."""
    jumps = {i: float(np.hypot(track[i + 1][0] - track[i][0], track[i + 1][1] - track[i][1]))
             for i in range(len(track) - 1) if track[i] is not None and track[i + 1] is not None}
    at = [jumps[b - 1] for b in boundaries if b - 1 in jumps]
    rest = [v for i, v in jumps.items() if i + 1 not in boundaries]
    phase = [v for i, v in jumps.items() if i + 1 not in boundaries and i % 4 == 0]
    if not (at and rest):
        return dict(seam=float("nan"), seam_mean=float("nan"), seam_phase=float("nan"))
    return dict(seam=max(at) / max(np.median(rest), 1e-6), seam_mean=float(np.mean(at)) / max(np.median(rest), 1e-6),
                seam_phase=max(at) / max(np.median(phase), 1e-6) if phase else float("nan"))


def metrics(frames: np.ndarray, boundaries: list[int]) -> dict:
    a = analyse(frames)
    bg = np.array(a.frame_backgrounds)  # [F, 3] border medians
    bg_drift = float(np.abs(bg - bg.mean(0)).max())
    # the seam ratios on the analyser's track (whole-pixel mask centroids) and on sub-pixel centroids; the one-pass
    # video, measured at the same frames, has no windows: its figures are the floor of each measure
    seams = seam_ratios(a.track, boundaries)
    soft = {f"soft_{k}": v for k, v in seam_ratios(soft_track(frames, a), boundaries).items()}
    colors = [c for c in a.frame_colors if c is not None]  # the object's interior median per frame (its colour,
    # not its anti-aliased or blurred edge, which is shape)
    obj_drift = float(np.abs(np.array(colors) - np.median(colors, 0)).max()) if colors else float("nan")
    followed = float(np.mean([p and s for p, s in zip(a.present, a.single)]))
    return dict(followed=followed, **seams, **soft, bg_drift=bg_drift, obj_drift=obj_drift, caption=a.caption())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=161)
    p.add_argument("--window", type=int, default=None, help="window frames (default: the model's)")
    p.add_argument("--overlap", type=int, default=None, help="window overlap in frames (default: the model's)")
    p.add_argument("--schedule", default=None, help="default: the model's, else uniform_standard")
    p.add_argument("--fuse", default=None, choices=["linear", "pyramid", "flat"])
    p.add_argument("--no_freenoise", dest="freenoise", action="store_const", const=False, default=None,
                   help="the windows without FreeNoise initial noise (on by default, as in the Pipeline)")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--seed", type=int, default=20260)
    p.add_argument("--extend", type=int, default=3, help="extensions of a 17-frame clip (0: none)")
    p.add_argument("--extend_frames", type=int, default=32)
    p.add_argument("--overlap_frames", type=int, default=9)
    p.add_argument("--modes", default="truth,truth vae,one pass,windows,extend,extend cut,extend hm")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--ckpt_dir", default=None, help="another model folder (default: the built-in model)")
    args = p.parse_args()
    modes = [m.strip() for m in args.modes.split(",")]
    pipe = kinema.Pipeline.load(args.ckpt_dir)
    given = dict(frames=args.window, overlap=args.overlap, schedule=args.schedule, fuse=args.fuse,
                 freenoise=args.freenoise)
    windows = parse_windows({k: v for k, v in given.items() if v is not None}, "windows",
                            pipe.models.info.sample_defaults.get("context", {}))
    print(f"windows: {windows.describe()}", flush=True)
    if not pipe.models.info.sample_defaults.get("context") and args.window is None:
        print("  (this model declares no windows: the wrapper's defaults, made for Wan2.1's 81 frames; give --window "
              "and --overlap for a model trained on shorter clips)", flush=True)
    total = (args.frames - 1) // 4 + 1
    size, _, overlap = windows.latent()
    edges = {e for w in windows_for("static_standard", 0, total, size, 1, overlap) for e in (w[0], w[-1] + 1)}
    # where a window starts or ends: latent frame k >= 1 decodes to pixel frames 4k-3 .. 4k
    boundaries = sorted(4 * k - 3 for k in edges - {0, total})
    rows = []
    for i, spec in enumerate(_specs(args.seed, args.prompts, 64, 64, tuple(world.COLORS))):
        for mode in modes:
            t0 = time.perf_counter()
            if mode.startswith("truth"):  # the world's render (and its VAE round trip): the floor of each measure
                truth = world.to_tensor(world.render(spec, 64, 64, args.frames))
                vae = pipe.models.vae
                with torch.no_grad():
                    video = vae.decode(vae.encode(truth[None].to(vae.device)))[0].cpu() if mode == "truth vae" else truth
                seams = boundaries
            elif mode.startswith("extend"):  # a 17-frame clip, then `extend` continuations, each from its last frames
                words = mode.split()[1:]
                if "truth" in words:  # a real clip to continue: the world's own 17-frame render
                    video = world.to_tensor(world.render(spec, 64, 64, 17))
                else:
                    video = pipe(spec.caption, frame_num=17, seed=args.seed + i, progress=False).video
                joins = []
                for k in range(args.extend):
                    joins.append(video.shape[1])
                    video = pipe(spec.caption, task="extend", video=video, extend_frames=args.extend_frames,
                                 overlap_frames=args.overlap_frames, seed=args.seed + i + 1000 * (k + 1),
                                 colour_match="hm" if "hm" in words else "overlap",
                                 overlap_join="cut" if "cut" in words else "blend",
                                 context_windows=windows if "windows" in words else False if "onepass" in words
                                 else None, progress=False).video
                seams = joins
            else:
                video = pipe(spec.caption, frame_num=args.frames, seed=args.seed + i,
                             context_windows=False if mode == "one pass" else windows, progress=False).video
                seams = boundaries
            row = dict(prompt=spec.caption, mode=mode, frames=video.shape[1],
                       seconds=round(time.perf_counter() - t0, 1), **metrics(to_uint8(video), seams))
            rows.append(row)
            print(f"{mode:10} {row['frames']:4d} frames {row['seconds']:6.1f}s followed {row['followed']:.2f} seam {row['seam']:.2f} "
                  f"(sub-pixel {row['soft_seam']:.2f}, vs latent starts {row['seam_phase']:.2f} / {row['soft_seam_phase']:.2f}) "
                  f"bg drift {row['bg_drift']:.1f} obj drift {row['obj_drift']:.1f}  {spec.caption} -> {row['caption']}",
                  flush=True)
    for mode in modes:
        r = [x for x in rows if x["mode"] == mode]
        print(f"{mode}: followed {np.mean([x['followed'] for x in r]):.2f}, seam ratio max "
              f"{np.nanmax([x['seam'] for x in r]):.2f} / median {np.nanmedian([x['seam'] for x in r]):.2f} (mean jump at "
              f"the seams over the median elsewhere: max {np.nanmax([x['seam_mean'] for x in r]):.2f}; sub-pixel "
              f"centroids: max {np.nanmax([x['soft_seam'] for x in r]):.2f}, mean-jump ratio max "
              f"{np.nanmax([x['soft_seam_mean'] for x in r]):.2f}, vs the other latent-frame starts max "
              f"{np.nanmax([x['soft_seam_phase'] for x in r]):.2f}), "
              f"background drift max {max(x['bg_drift'] for x in r):.1f}, object drift max "
              f"{np.nanmax([x['obj_drift'] for x in r]):.1f}, {np.mean([x['seconds'] for x in r]):.1f} s per video")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
