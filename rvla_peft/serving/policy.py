"""What the server serves: the config of a base and adapter (as evaluation sets them up) and the metadata that
``GET /metadata`` answers, the adapter's robustness results included."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from rvla_peft.adapters import HubError, adapter_recipe, resolve_adapter
from rvla_peft.config import load_config
from rvla_peft.utils.constants import POLICY_SETTINGS_FILE, RECIPE_FILE, REPORT_DIR, REPORT_JSON

# policy.json keys (written by rvla_peft.pretrain beside a base) -> the recipe keys they set
_TRAINED_SETTINGS = {
    "family": "policy.family",
    "prompt_template": "policy.prompt_template",
    "action_dim": "policy.action_dim",
    "n_bins": "policy.n_bins",
    "action_low": "policy.action_low",
    "action_high": "policy.action_high",
    "image_size": "env.image_size",
}


def trained_settings_overrides(name_or_path: str | None) -> list[str]:
    """Overrides from the ``policy.json`` beside a base made by ``rvla_peft.pretrain`` (the settings it decodes
    with), for a base served without a recipe."""
    if not name_or_path:
        return []
    from rvla_peft.models.tiny import resolve_builtin

    try:
        settings = Path(resolve_builtin(name_or_path)) / POLICY_SETTINGS_FILE
    except (ValueError, FileNotFoundError):
        return []
    if not settings.is_file():
        return []
    trained = json.loads(settings.read_text())
    return [f"{key}={json.dumps(trained[name])}" for name, key in _TRAINED_SETTINGS.items() if name in trained]


def robustness_of(adapter_dir: Path, adapter: str) -> dict | None:
    """The adapter's robustness results, as its model card shows them, from the report beside it (a pushed repo,
    a packaged adapter) or in its run folder (OUTPUT/report); None without one."""
    from rvla_peft.cards import robustness_table, select_policy

    for path in (adapter_dir / REPORT_JSON, adapter_dir.parent / REPORT_DIR / REPORT_JSON):
        if path.is_file():
            report = json.loads(path.read_text())
            try:
                policy = select_policy(report, adapter_dir, repo_id=adapter)
            except HubError:
                return None
            return {
                "policy": policy,
                "task": report.get("task"),
                "episodes": report.get("episodes"),
                "summary": report.get("summary", {}).get(policy),
                "results": [r for r in report.get("results", []) if r["policy"] == policy],
                "table": robustness_table(report, policy),
            }
    return None


def serve_config(
    base: str | None, adapter: str | None, recipe: str | Path | None = None, overrides: list[str] | None = None
):
    """``(config, local adapter folder or None)``: the recipe is ``recipe``, else the adapter's, else a merged
    export's beside ``base``; a base served without any gets the settings it was trained with (its policy.json)."""
    local = resolve_adapter(adapter) if adapter else None
    if recipe is None and local is not None:
        with contextlib.suppress(HubError):
            recipe = adapter_recipe(local)
    if recipe is None and base and (Path(base) / RECIPE_FILE).is_file():
        recipe = Path(base) / RECIPE_FILE  # a merged export carries its recipe
    resolved = [] if recipe is not None else trained_settings_overrides(base)
    resolved += list(overrides or [])
    if base:
        resolved.append(f"model.name_or_path={base}")
    return load_config(recipe, resolved), local


def default_instruction(cfg) -> str:
    """The env's instruction for the task (what clients of a task-trained policy send), or a placeholder."""
    from rvla_peft.envs.maniskill import resolve_instruction

    try:
        return resolve_instruction(cfg.env)
    except ValueError:
        return "do the task"


def served_metadata(policy, cfg, *, adapter: str | None, adapter_dir: Path | None, image_size: int, **extra) -> dict:
    """``GET /metadata``: the family, the base and adapter, the image the clients send, the action's shape (from
    one warm-up call, which also pays the first call's costs), and the adapter's robustness results."""
    import numpy as np

    from rvla_peft.policies.registry import base_model_id

    instruction = default_instruction(cfg)
    action = policy.predict_action(np.zeros((image_size, image_size, 3), np.uint8), instruction)
    return {
        "family": cfg.policy.family,
        "base": base_model_id(cfg.model),
        "adapter": adapter,
        "task": cfg.env.task,
        "instruction": instruction,
        "image_size": [image_size, image_size],
        "model_image_size": list(policy.image_hw),
        "action_shape": list(action.shape),
        "action_dtype": str(action.dtype),
        "chunk_size": int(action.shape[0]) if action.ndim == 2 else 1,
        "action_dim": int(action.shape[-1]),
        "control_mode": cfg.env.control_mode,
        "unnorm_key": getattr(cfg.policy, "unnorm_key", None),
        "uses_state": bool(getattr(cfg.policy, "use_state", False)),
        "lora_merged": bool(adapter_dir is not None and cfg.policy.merge_lora_to_act),
        **extra,
        "robustness": robustness_of(adapter_dir, adapter) if adapter_dir is not None else None,
    }
