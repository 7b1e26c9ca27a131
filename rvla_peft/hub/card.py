"""The model card of a robust adapter: metadata (base model, tags, model-index from the robustness report), the
robustness table, the training curve and the template rendered with huggingface_hub's ``ModelCard``."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from rvla_peft.adapters import HubError, is_hub_id, is_local_path
from rvla_peft.config import ModelConfig, TrainConfig
from rvla_peft.hub.run_files import RunFiles
from rvla_peft.models.tiny import PACKAGED, PACKAGED_ADAPTERS
from rvla_peft.perturbations import PERTURBATIONS, resample_note, spec_records
from rvla_peft.policies.registry import resolve_lora
from rvla_peft.utils.constants import (
    ACTION_HEADS_FILE,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BUILTIN_PREFIX,
    CARD_FILE,
    CURVE_PNG,
    RECIPE_FILE,
    REPORT_JSON,
    REPORT_MD,
    REPORT_PNG,
    TRAINER_STATE,
    VALUE_HEAD_FILE,
)

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCard

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "adapter_card.md"
PIPELINE_TAG = "robotics"
BASE_TAGS = ("lora", "robustness", "rvla-peft")


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


def select_policy(report: dict, adapter_dir: Path, repo_id: str | None = None, name: str | None = None) -> str:
    """The report's policy that is the pushed adapter: ``name``, else the one whose adapter is this folder (or this
    repo), else the only adapted policy."""
    policies = report.get("policies", [])
    names = [p["name"] for p in policies]
    if name is not None:
        if name not in names:
            raise HubError(f"--policy {name!r} is not in the report, whose policies are {names}")
        return name
    here = Path(adapter_dir).resolve()
    for policy in policies:
        adapter = policy.get("adapter")
        if adapter and (adapter == repo_id or Path(adapter).expanduser().resolve() == here):
            return policy["name"]
    adapted = [p["name"] for p in policies if p.get("adapter")]
    if len(adapted) == 1:
        return adapted[0]
    raise HubError(
        f"the report evaluates {len(adapted)} adapters {adapted} and none of them is {adapter_dir}: "
        "choose the one being pushed with --policy NAME"
    )


def _baseline(report: dict, policy: str) -> str | None:
    paired = [p["baseline"] for p in report.get("paired", []) if p["policy"] == policy]
    if paired:
        return paired[0]
    bases = [p["name"] for p in report.get("policies", []) if not p.get("adapter")]
    return bases[0] if bases else None


def _results(report: dict, policy: str | None) -> dict[str, dict]:
    return {r["setting"]: r for r in report.get("results", []) if r["policy"] == policy}


def eval_results(report: dict, policy: str) -> list[EvalResult]:
    """One ``EvalResult`` per evaluated setting: the success rate of ``policy``, exactly as report.json has it.

    The setting is the dataset config (``rotation@0.5``), so each one is its own model-index entry.
    """
    from huggingface_hub import EvalResult

    task = report["task"]
    by_setting = _results(report, policy)
    out = []
    for setting in report.get("settings", []):
        result = by_setting.get(setting["name"])
        if result is None:
            continue
        out.append(
            EvalResult(
                task_type=PIPELINE_TAG,
                task_name="Robotic manipulation",
                dataset_type=task,
                dataset_name=f"ManiSkill3 {task} (simulated)",
                dataset_config=setting["name"],
                dataset_args={
                    "perturbation": setting["perturbation"],
                    "severity": setting["severity"],
                    "episodes": result["episodes"],
                    "seed": report["seed"],
                },
                metric_type="success_rate",
                metric_name=f"success rate ({setting['name']})",
                metric_value=result["success_rate"],
            )
        )
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ci(ci: list[float] | None, scale: float = 100) -> str:
    return "" if not ci else f" [{scale * ci[0]:.0f}, {scale * ci[1]:.0f}]"


def robustness_table(report: dict, policy: str) -> str:
    """Markdown: per setting, the adapter's success (95% CI), the base's, the paired difference (95% CI), and
    whether the perturbation's random parameters were held per episode or redrawn every step (where recorded)."""
    baseline = _baseline(report, policy)
    ours, theirs = _results(report, policy), _results(report, baseline)
    paired = {p["setting"]: p for p in report.get("paired", []) if p["policy"] == policy}
    notes = {s["name"]: resample_note(s.get("specs", [])) for s in report.get("settings", [])}
    drawn = any(notes.values())  # older reports do not record it
    head = f"| setting | {policy}: success [95% CI] | mean return |"
    rule = "|---|---|---|"
    if baseline:
        head += f" {baseline}: success | difference [95% CI] |"
        rule += "---|---|"
    if drawn:
        head += " random parameters |"
        rule += "---|"
    rows = [head, rule]
    for setting in report.get("settings", []):
        r = ours.get(setting["name"])
        if r is None:
            continue
        row = f"| `{setting['name']}` | {_pct(r['success_rate'])}{_ci(r.get('ci95'))} | {r['mean_return']:.3g} |"
        if baseline:
            b, d = theirs.get(setting["name"]), paired.get(setting["name"])
            diff = "-" if d is None else f"{100 * d['difference']:+.0f} pts{_ci(d.get('ci95'))}"
            row += f" {_pct(b and b['success_rate'])} | {diff} |"
        if drawn:
            row += f" {notes[setting['name']] or '-'} |"
        rows.append(row)
    return "\n".join(rows) + "\n\n" + interval_footnote(report, paired=bool(baseline))


def interval_footnote(report: dict, paired: bool = True) -> str:
    """The methods of the table's intervals, named once, as the report records them (older reports used a normal
    approximation for the paired difference)."""
    methods = report.get("intervals") or {}
    success = methods.get("results", "Wilson score interval over the setting's episodes")
    text = f"Intervals: success, {success}"
    if paired:
        text += f"; difference, {methods.get('paired', 'normal approximation of the per-episode differences')}"
    return text + "."


def summary_line(report: dict, policy: str) -> str:
    s = report.get("summary", {}).get(policy)
    if not s:
        return ""
    return (
        f"Success rate clean **{_pct(s['clean_success_rate'])}**, mean over perturbed settings "
        f"**{_pct(s['mean_perturbed_success_rate'])}** (robustness gap {100 * s['robustness_gap']:.0f} pts)."
    )


def untried_perturbations(report: dict | None) -> list[str]:
    """Registered perturbations the report did not evaluate: the card says robustness to them is unknown."""
    tried = {s["perturbation"] for s in (report or {}).get("settings", [])}
    return sorted(set(PERTURBATIONS) - tried)


def training_eval_table(rows: list[dict]) -> str:
    """The end-of-training evaluation in metrics.jsonl (few episodes): shown when there is no report yet."""
    last = next((r for r in reversed(rows) if any(k.startswith("eval/") for k in r)), None)
    if last is None:
        return ""
    settings = sorted({k.split("/")[1] for k in last if k.startswith("eval/")}, key=lambda s: (s != "clean", s))
    lines = ["| setting | success rate | mean return |", "|---|---|---|"]
    for s in settings:
        ret = last.get(f"eval/{s}/return")
        lines.append(
            f"| `{s}` | {_pct(last.get(f'eval/{s}/success_rate'))} | {'-' if ret is None else f'{ret:.3g}'} |"
        )
    return "\n".join(lines)


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


def training_method(cfg: TrainConfig) -> str:
    """The card's one-sentence account of how the adapter was trained: the algorithm and the penalties that were on."""
    regs = cfg.regularizers
    teacher = "the base model's" if regs.invariance.target == "base" else "its own"
    penalties = [
        text
        for weight, text in (
            (regs.jacobian.weight, "a Jacobian penalty that makes the action insensitive to small image changes"),
            (regs.smoothness.weight, "a smoothness penalty that keeps the policy close to its previous self"),
            (
                regs.invariance.weight,
                f"an invariance penalty that pulls the action distribution on a perturbed frame "
                f"towards {teacher} on the clean one",
            ),
            (cfg.kl_to_base, "a KL penalty that keeps it near the base model"),
        )
        if weight
    ]
    algorithm = cfg.algorithm.upper()  # ppo, rloo, grpo: the schema allows no other
    if not penalties:
        return f"{algorithm} on the task's reward, with no penalty"
    listed = penalties[0] if len(penalties) == 1 else ", ".join(penalties[:-1]) + " and " + penalties[-1]
    cite = " (the Jacobian and smoothness penalties are RobustVLA's, [arXiv 2511.01331](https://arxiv.org/abs/2511.01331))"
    return f"{algorithm} on the task's reward, with {listed}" + (
        cite if regs.jacobian.weight or regs.smoothness.weight else ""
    )


def build_card_data(cfg: TrainConfig, base_id: str, repo_id: str, report: dict | None, policy: str | None):
    from huggingface_hub import ModelCardData

    results = eval_results(report, policy) if report and policy else None
    return ModelCardData(
        library_name="peft",
        base_model=base_id if is_hub_id(base_id) else None,  # the Hub rejects ids that are not models
        pipeline_tag=PIPELINE_TAG,
        tags=[*BASE_TAGS, cfg.env.task],
        model_name=repo_id.split("/")[-1] if results else None,
        eval_results=results or None,
    )


def render_card(
    run: RunFiles,
    cfg: TrainConfig,
    *,
    repo_id: str,
    base_id: str,
    policy: str | None = None,
    revision: str | None = None,
    has_curve: bool = False,
    checkpoint_update: int | None = None,
    template: str | Path | None = None,
) -> ModelCard:
    """The model card: metadata (peft, base, robotics, tags, model-index) and the body from the template shipped
    inside the package (``rvla_peft/templates/``, package data of the wheel)."""
    from huggingface_hub import ModelCard

    report = run.report()
    policy = select_policy(report, run.adapter_dir, repo_id, policy) if report else None
    template = Path(template) if template else TEMPLATE
    if not template.is_file():
        raise HubError(f"card template {template} not found: it ships inside the package (rvla_peft/templates/)")
    # A recipe may leave LoRA keys unset (the family's defaults apply): the card names what was trained.
    cfg = dataclasses.replace(cfg, lora=resolve_lora(cfg.policy.family, cfg.lora))
    data = build_card_data(cfg, base_id, repo_id, report, policy)
    regs = cfg.regularizers
    name = repo_id.split("/")[-1]
    return ModelCard.from_template(
        data,
        template_path=template,
        repo_id=repo_id,
        name=name,
        revision=revision,
        base_id=base_id,
        base_on_hub=is_hub_id(base_id),
        base_builtin=base_id.startswith(BUILTIN_PREFIX),
        base_packaged=base_id in {BUILTIN_PREFIX + name for name in PACKAGED},
        # a card for an adapter shipped in rvla_peft/assets (--repo-id builtin:NAME): snippets that load it from there
        adapter_packaged=repo_id in {BUILTIN_PREFIX + name for name in PACKAGED_ADAPTERS},
        packaged_name=repo_id.removeprefix(BUILTIN_PREFIX),
        task=cfg.env.task,
        cfg=cfg,
        method=training_method(cfg),
        train_perturbations=", ".join(
            f"`{s.name}@{s.severity:g}` ({resample_note(spec_records([s]))})" for s in cfg.perturb.train
        )
        or "none",
        lora_targets=cfg.lora.target_modules
        if isinstance(cfg.lora.target_modules, str)
        else ", ".join(cfg.lora.target_modules),
        jacobian=f"alpha = {regs.jacobian.weight:g} ({regs.jacobian.form})" if regs.jacobian.weight else "off",
        smoothness=f"beta = {regs.smoothness.weight:g} ({regs.smoothness.form})" if regs.smoothness.weight else "off",
        invariance=f"gamma = {regs.invariance.weight:g} ({regs.invariance.form}, to the {regs.invariance.target} "
        "policy on the clean frame)"
        if regs.invariance.weight
        else "off",
        report=report,
        policy=policy,
        summary=summary_line(report, policy) if report else "",
        table=robustness_table(report, policy) if report else "",
        has_robustness_png=bool(run.report_dir and (run.report_dir / REPORT_PNG).is_file()),
        training_eval=training_eval_table(run.metric_rows()),
        has_curve=has_curve,
        recipe_yaml=run.recipe.read_text().rstrip(),
        untried=untried_perturbations(report),
        checkpoint_update=checkpoint_update,
        interrupted_at=interrupted_update(run.adapter_dir),
    )


def interrupted_update(adapter_dir: Path) -> int | None:
    """The update at which a signal stopped the run that wrote ``adapter_dir`` (its trainer_state.json), or None."""
    state = adapter_dir / TRAINER_STATE
    try:
        record = json.loads(state.read_text()) if state.is_file() else {}
    except (OSError, ValueError):
        return None
    return int(record["update"]) if record.get("interrupted") else None


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
    has_curve = plot_training_curve(run.metric_rows(), staging / CURVE_PNG, f"{repo_id}: {cfg.env.task}")
    card = render_card(
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
