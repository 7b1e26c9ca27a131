"""Rollout clips: frames laid side by side with captions (PIL's default font), written as MP4 and GIF by imageio.

A clip shows the observations a policy's env returned (after the observation perturbations: what the policy saw),
every env step of the episode, its last observation included. Several policies on the same episode stand side by
side, each panel captioned with its name and, once its episode has ended, the outcome (a green border for a
success, red for a failure); a band above them names the setting and the episode. Writing needs the ``video``
extra (``pip install 'rvla_peft[video]'``: imageio and imageio-ffmpeg, which brings its own ffmpeg binary).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BAND = 16  # caption band height in pixels (a multiple of 16 keeps frames of 16-aligned images codec-friendly)
PANEL_MIN_WIDTH = 128  # smaller frames are upscaled (nearest neighbour) by a whole factor so that captions fit
SUCCESS, FAILURE, TEXT, BACKGROUND = (40, 170, 70), (200, 50, 50), (235, 235, 235), (25, 25, 25)
FPS = 10  # ManiSkill's control frequency for the tabletop tasks is 20 Hz; half speed is easier to follow
GIF_EVERY = 2  # the GIF keeps every 2nd frame (at half the frame rate: the same duration), to stay small
HOLD = FPS // 2  # the last frame (every outcome shown) held for half a second before the next episode


@dataclass
class EpisodeFrames:
    """One policy's frames of one episode: uint8 [T, H, W, 3] and its outcome (None: none shown, a stretch of
    frames rather than a whole episode)."""

    policy: str
    frames: np.ndarray
    success: bool | None


def panel_scale(width: int) -> int:
    """The whole upscaling factor of a frame ``width`` pixels wide: the smallest that reaches PANEL_MIN_WIDTH."""
    return max(1, -(-PANEL_MIN_WIDTH // width))


def panel_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of one policy's panel for frames of ``height`` x ``width``: the upscaled image, rounded up to
    even sizes (what H.264's yuv420p needs), plus the caption band below it."""
    s = panel_scale(width)
    return 2 * -(-height * s // 2) + BAND, 2 * -(-width * s // 2)


def frame_size(height: int, width: int, policies: int) -> tuple[int, int]:
    """(height, width) of a side-by-side frame: the setting's band on top, the panels in a row."""
    panel_h, panel_w = panel_size(height, width)
    return BAND + panel_h, policies * panel_w


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _fit(text: str, width: int, font) -> str:
    """``text`` cut (with "...") to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def side_by_side(episodes: list[EpisodeFrames], title: str, hold: int = HOLD) -> list[np.ndarray]:
    """The frames of one episode played by several policies, side by side: as many frames as the longest episode
    (a finished one holds its last frame, captioned with its outcome), then the last one ``hold`` more times."""
    from PIL import Image, ImageDraw

    font = _font()
    height, width = episodes[0].frames.shape[1:3]
    scale = panel_scale(width)
    panel_h, panel_w = panel_size(height, width)
    out_h, out_w = frame_size(height, width, len(episodes))
    length = max(len(e.frames) for e in episodes)
    clip = []
    for t in range(length):
        canvas = Image.new("RGB", (out_w, out_h), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        draw.text((4, 2), _fit(title, out_w - 8, font), fill=TEXT, font=font)
        for i, episode in enumerate(episodes):
            ended = t >= len(episode.frames) - 1
            image = Image.fromarray(episode.frames[min(t, len(episode.frames) - 1)])
            if scale > 1:
                image = image.resize((width * scale, height * scale), Image.Resampling.NEAREST)
            x = i * panel_w
            canvas.paste(image, (x, BAND))
            if ended and episode.success is not None:
                colour = SUCCESS if episode.success else FAILURE
                draw.rectangle([x, BAND, x + width * scale - 1, BAND + height * scale - 1], outline=colour, width=3)
                caption = f"{episode.policy}: {'success' if episode.success else 'failure'}"
            else:
                colour, caption = TEXT, f"{episode.policy}: step {t}"
            draw.text((x + 4, panel_h + 2), _fit(caption, panel_w - 8, font), fill=colour, font=font)
        clip.append(np.asarray(canvas))
    return clip + [clip[-1]] * hold


def write_mp4(frames: list[np.ndarray], path: Path, fps: int = FPS) -> None:
    """H.264 (yuv420p, what browsers play) through imageio's ffmpeg plugin; frames are never resized."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(
        path, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1
    ) as writer:
        for frame in frames:
            writer.append_data(frame)


def write_gif(frames: list[np.ndarray], path: Path, fps: int = FPS, every: int = GIF_EVERY) -> None:
    """A looping GIF of every ``every``-th frame at ``fps / every`` (the same duration), written by imageio."""
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    kept = frames[::every]
    if len(frames) > 1 and (len(frames) - 1) % every:
        kept.append(frames[-1])  # the last frame (the outcomes) always in
    iio.imwrite(path, np.stack(kept), extension=".gif", duration=int(1000 * every / fps), loop=0)


def file_stem(name: str) -> str:
    """A setting's name as a file name: ``color_jitter@0.5`` -> ``color_jitter_0.5``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "setting"


def check_installed() -> None:
    """Raise a one-line error naming the fix if the video writers are missing (before any episode runs)."""
    import importlib.util

    missing = [m for m in ("imageio", "imageio_ffmpeg") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"videos need {' and '.join(missing)}: pip install 'rvla_peft[video]'")
