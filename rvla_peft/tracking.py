"""The trackers a training run reports to (``report_to``), through Accelerate's tracker layer, and its rollout clips.

Every tracker receives the same metrics under the same names as metrics.jsonl (``accelerator.log``). Where each
writes: TensorBoard, ``OUTPUT_DIR/rvla_peft/``; Weights & Biases, ``OUTPUT_DIR/wandb/`` (or ``WANDB_DIR``), project
``rvla_peft``, the run named after the output folder and carrying the resolved recipe as its config (offline with
``WANDB_MODE=offline``, synced later with ``wandb sync``); SwanLab, its own defaults.

``video_every`` N: every N updates, the frames env 0 saw during the update's rollout (after the observation
perturbations; beside them the clean frames where the run keeps them) become ``OUTPUT_DIR/videos/update-N.gif``,
logged as ``rollout/video``: to Weights & Biases as a ``wandb.Video`` of that GIF, to TensorBoard as an image strip
of 8 of its frames (TensorBoard's ``add_video`` needs moviepy, which is not a dependency here); other trackers get
the file only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from rvla_peft.config import ConfigError, TrainConfig, to_dict
from rvla_peft.utils.constants import TENSORBOARD_RUN, VIDEOS_DIR

# the package each tracker imports, and the extra that installs it
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "rvla_peft"), "wandb": ("wandb", "rvla_peft[track]"),
                    "swanlab": ("swanlab", "swanlab")}  # fmt: skip
VIDEO_KEY = "rollout/video"
STRIP_FRAMES = 8


def check_reporting(cfg: TrainConfig) -> None:
    """A one-line error naming the install command when a tracker in ``report_to`` (or the video writer for
    ``video_every``) is not installed: Accelerate would otherwise drop the tracker silently."""
    for tracker in cfg.report_to:
        package, install = TRACKER_PACKAGES[tracker]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"report_to: {tracker!r} needs the {package} package: pip install '{install}'")
    if cfg.video_every:
        from rvla_peft.utils.video import check_installed

        try:
            check_installed()
        except ValueError as e:
            raise ConfigError(f"video_every: {e}") from None


def tracker_kwargs(cfg: TrainConfig, start_update: int) -> dict[str, dict]:
    """``init_kwargs`` of ``accelerator.init_trackers`` for the trackers in ``report_to``."""
    kwargs: dict[str, dict] = {}
    if "tensorboard" in cfg.report_to and start_update:
        # TensorBoard continues a resumed run in the same folder, hiding what was logged after the checkpoint.
        kwargs["tensorboard"] = {"purge_step": start_update + 1}
    if "wandb" in cfg.report_to:
        output = Path(cfg.output_dir)
        kwargs["wandb"] = {"name": output.name, "config": to_dict(cfg)}
        if not os.environ.get("WANDB_DIR"):
            output.mkdir(parents=True, exist_ok=True)
            kwargs["wandb"]["dir"] = str(output)
    return kwargs


def init_trackers(accelerator, cfg: TrainConfig, start_update: int = 0) -> None:
    if cfg.report_to:
        accelerator.init_trackers(TENSORBOARD_RUN, init_kwargs=tracker_kwargs(cfg, start_update))


def rollout_clip(rollout, update: int) -> list[np.ndarray]:
    """The annotated frames of env 0 in a PPO rollout (the first kept episode of a group rollout), the clean frames
    beside them where the rollout kept them."""
    from rvla_peft.utils.video import EpisodeFrames, side_by_side

    if hasattr(rollout, "env_index"):  # GroupRollout: samples flat, episode by episode
        seen = rollout.rgb[rollout.episode == 0]
        clean = None
    else:
        seen, clean = rollout.rgb[:, 0], None if rollout.rgb_clean is None else rollout.rgb_clean[:, 0]
    panels = [EpisodeFrames("seen", seen.cpu().numpy(), None)]
    if clean is not None:
        panels.insert(0, EpisodeFrames("clean", clean.cpu().numpy(), None))
    return side_by_side(panels, f"update {update} | env 0 | {rollout.instructions[0]}", hold=0)


def log_rollout_clip(accelerator, rollout, update: int, output_dir: Path) -> Path | None:
    """Write the update's rollout clip as a GIF and log it to the trackers (main process); its path."""
    if not accelerator.is_main_process or len(rollout.rgb) == 0:
        return None
    from rvla_peft.utils.video import write_gif

    clip = rollout_clip(rollout, update)
    path = Path(output_dir) / VIDEOS_DIR / f"update-{update:06d}.gif"
    write_gif(clip, path, every=1)
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({VIDEO_KEY: wandb.Video(str(path), format="gif")}, step=update)
        elif tracker.name == "tensorboard":
            picks = np.linspace(0, len(clip) - 1, min(STRIP_FRAMES, len(clip))).round().astype(int)
            strip = np.concatenate([clip[i] for i in picks], axis=1)
            tracker.writer.add_image(VIDEO_KEY, strip, update, dataformats="HWC")
    return path
