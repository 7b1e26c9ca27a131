"""What a push uploads, staged in a local folder: the adapter with its base named by a Hub id, the value head, the
recipe, the report (with its rollout GIFs), the training curve and the model card (rendered by
:mod:`rvla_peft.cards`)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from rvla_peft.adapters import HubError, is_local_path
from rvla_peft.cards import adapter_card, report_gifs
from rvla_peft.config import ModelConfig
from rvla_peft.hub.run_files import RunFiles
from rvla_peft.utils.constants import (
    ACTION_HEADS_FILE,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD_FILE,
    CURVE_PNG,
    RECIPE_FILE,
    REPORT_JSON,
    REPORT_MD,
    REPORT_PNG,
    TRAINER_STATE,
    VALUE_HEAD_FILE,
)

logger = logging.getLogger(__name__)


def resolve_base_id(recorded: str | None, model_cfg: ModelConfig, override: str | None = None) -> str:
    """The id the pushed adapter_config.json names as its base: others must be able to load it.

    PEFT records whatever path the base was loaded from; a local folder means nothing on another machine, so it is
    replaced by ``model.hub_id`` from the recipe, or refused.
    """
    if override:
        return override
    if recorded and not is_local_path(recorded):
        return recorded
    if model_cfg.hub_id:
        return model_cfg.hub_id
    raise HubError(
        f"the adapter's base_model_name_or_path is the local path {recorded!r}, which nobody else can load: set "
        "model.hub_id in the recipe to the base's Hub id (e.g. model.hub_id=openvla/openvla-7b) and save again, "
        "or pass --base-id ORG/NAME"
    )


def plot_training_curve(rows: list[dict], out: Path, title: str = "") -> bool:
    """``rollout/return`` and ``rollout/success_rate`` per PPO update to a PNG; False when there is nothing to draw.

    Uses the Agg canvas directly: no pyplot, so the caller's matplotlib backend is left alone.
    """
    rows = [r for r in rows if "rollout/return" in r or "rollout/success_rate" in r]
    if not rows:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), dpi=110)
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate(
        [("rollout/return", "episode return"), ("rollout/success_rate", "success rate")], start=1
    ):
        ax = fig.add_subplot(1, 2, i)
        points = [(r["update"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", ms=3, lw=1.2)
        ax.set_xlabel("PPO update")
        ax.set_ylabel(label)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    return True


def stage(
    run: RunFiles,
    staging: Path,
    *,
    repo_id: str,
    base_id: str | None = None,
    policy: str | None = None,
    revision: str | None = None,
    checkpoint_update: int | None = None,
    template: str | Path | None = None,
) -> list[str]:
    """Write into ``staging`` every file of the upload; the run folder is only read. Returns the repo paths."""
    cfg = run.cfg
    adapter = run.adapter_dir
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        hint = (
            " (found adapter_model.bin: save with safe_serialization=True)"
            if (adapter / "adapter_model.bin").exists()
            else ""
        )
        raise HubError(f"no {ADAPTER_WEIGHTS} in {adapter}{hint}: only safetensors adapters are pushed")
    adapter_config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    base_id = resolve_base_id(adapter_config.get("base_model_name_or_path"), cfg.model, base_id)
    adapter_config["base_model_name_or_path"] = base_id
    staging.mkdir(parents=True, exist_ok=True)
    (staging / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(adapter / ADAPTER_WEIGHTS, staging / ADAPTER_WEIGHTS)
    if (adapter / VALUE_HEAD_FILE).is_file():
        shutil.copyfile(adapter / VALUE_HEAD_FILE, staging / VALUE_HEAD_FILE)
    else:
        logger.warning("%s has no %s: load_policy will start from a fresh value head", adapter, VALUE_HEAD_FILE)
    if (adapter / ACTION_HEADS_FILE).is_file():  # OpenVLA-OFT's fully trained action and scale heads
        shutil.copyfile(adapter / ACTION_HEADS_FILE, staging / ACTION_HEADS_FILE)
    shutil.copyfile(run.recipe, staging / RECIPE_FILE)
    if (adapter / TRAINER_STATE).is_file():
        shutil.copyfile(adapter / TRAINER_STATE, staging / TRAINER_STATE)
    if run.report_dir:
        for name in (REPORT_JSON, REPORT_MD, REPORT_PNG):
            if (run.report_dir / name).is_file():
                shutil.copyfile(run.report_dir / name, staging / name)
        for gif in report_gifs(run.report(), run.report_dir):  # the rollout clips the card shows (not the MP4s)
            (staging / gif).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run.report_dir / gif, staging / gif)
    has_curve = plot_training_curve(run.metric_rows(), staging / CURVE_PNG, f"{repo_id}: {cfg.env.task}")
    card = adapter_card(
        run,
        cfg,
        repo_id=repo_id,
        base_id=base_id,
        policy=policy,
        revision=revision,
        has_curve=has_curve,
        checkpoint_update=checkpoint_update,
        template=template,
    )
    card.save(staging / CARD_FILE)
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
