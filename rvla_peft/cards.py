"""Model cards, one renderer for all: a ``ModelCardData`` header and a Jinja template of ``rvla_peft/templates/``
(package data of the wheel), one template per kind of checkpoint:

- ``adapter_card.md``: a robust LoRA adapter (``python -m rvla_peft.hub card|push``, the shipped adapters), with the
  robustness table and model-index taken from its ``report.json``;
- ``base_card.md``: a base pretrained by behaviour cloning (``python -m rvla_peft.pretrain``), from its
  ``pretrain.json``;
- ``merged_card.md``: an adapter merged into its base (``python -m rvla_peft.export``).

The cards of the bases and adapters shipped in ``rvla_peft/assets/`` are rendered from their own files; the
repository keeps a copy of each in ``cards/``: ``python -m rvla_peft.cards --out cards`` rewrites both.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rvla_peft.adapters import HubError, is_hub_id
from rvla_peft.config import TrainConfig, load_config
from rvla_peft.models.tiny import ASSETS_DIR, PACKAGED, PACKAGED_ADAPTERS
from rvla_peft.perturbations import PERTURBATIONS, resample_note, spec_records
from rvla_peft.utils.constants import (
    ACTION_HEADS_FILE,
    ADAPTER_CONFIG,
    BUILTIN_PREFIX,
    CARD_FILE,
    CURVE_PNG,
    POLICY_SETTINGS_FILE,
    PRETRAIN_RECORD_FILE,
    RECIPE_FILE,
    REPORT_JSON,
    REPORT_PNG,
    TRAINER_STATE,
)

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATES = Path(__file__).resolve().parent / "templates"
ADAPTER_TEMPLATE, BASE_TEMPLATE, MERGED_TEMPLATE = "adapter_card.md", "base_card.md", "merged_card.md"
WARMUP_TEMPLATE = "warmup_card.md"
PIPELINE_TAG = "robotics"
BASE_TAGS = ("lora", "robustness", "rvla-peft")
CARD_TEMPLATES = (ADAPTER_TEMPLATE, BASE_TEMPLATE, MERGED_TEMPLATE, WARMUP_TEMPLATE)
# the copies in the repository's cards/ link to the files beside the shipped card
CARDS_LINK_PREFIX = "../rvla_peft/assets/{name}/"


class AdapterFiles(Protocol):
    """What an adapter card reads: :class:`rvla_peft.hub.run_files.RunFiles` (a training run) or
    :class:`ShippedAdapter` (a folder of ``rvla_peft/assets``)."""

    adapter_dir: Path
    recipe: Path
    report_dir: Path | None

    def report(self) -> dict | None: ...

    def metric_rows(self) -> list[dict]: ...


def render(data: ModelCardData, template: str | Path, **context) -> ModelCard:
    """The one renderer: ``data`` as the card's YAML header, then ``template`` (a name in ``rvla_peft/templates/``
    or a path) rendered with ``context``; the text ends with one newline."""
    from huggingface_hub import ModelCard

    path = TEMPLATES / template if template in CARD_TEMPLATES else Path(template)
    if not path.is_file():
        raise HubError(f"card template {path} not found: the templates ship inside the package (rvla_peft/templates/)")
    card = ModelCard.from_template(data, template_path=str(path), **context)
    card.text = card.text.rstrip("\n") + "\n"
    return card


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


def report_gifs(report: dict | None, report_dir: Path | None) -> list[str]:
    """The rollout GIFs a report lists (``eval --video K``) that are on disk beside it, as paths relative to it."""
    if not report or not report_dir:
        return []
    return [v["gif"] for v in report.get("videos", []) if (report_dir / v["gif"]).is_file()]


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


def adapter_card(
    run: AdapterFiles,
    cfg: TrainConfig,
    *,
    repo_id: str,
    base_id: str,
    policy: str | None = None,
    revision: str | None = None,
    has_curve: bool = False,
    checkpoint_update: int | None = None,
    template: str | Path | None = None,
    files: str = "",
) -> ModelCard:
    """The card of a robust adapter: metadata (peft, base, robotics, tags, model-index from the report) and the
    body of ``adapter_card.md`` (or ``template``). ``files``: put before the card's links to the files beside it."""
    from rvla_peft.policies.registry import resolve_lora

    report = run.report()
    policy = select_policy(report, run.adapter_dir, repo_id, policy) if report else None
    # A recipe may leave LoRA keys unset (the family's defaults apply): the card names what was trained.
    cfg = dataclasses.replace(cfg, lora=resolve_lora(cfg.policy.family, cfg.lora))
    data = build_card_data(cfg, base_id, repo_id, report, policy)
    regs = cfg.regularizers
    name = repo_id.split("/")[-1]
    return render(
        data,
        template or ADAPTER_TEMPLATE,
        files=files,
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
        videos=[v for v in (report or {}).get("videos", []) if v["gif"] in report_gifs(report, run.report_dir)],
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


def base_card(record: dict) -> ModelCard:
    """The card of a base pretrained by ``rvla_peft.pretrain``, from its ``pretrain.json`` record: what it is, how to
    load it, how it was made, what it achieved (and, when the record has an ``evaluation`` text, the evaluation)."""
    from huggingface_hub import ModelCardData

    settings, data, best, args = record["policy"], record["dataset"], record["best"], record["args"]
    tasks = list(dict.fromkeys(row["task"] for row in data["sources"]))
    demo_rows = "\n".join(
        f"| `{Path(r['folder']).name}` | {r['task']} | {r['episodes']} | {r['steps']} | {r['first_seed']} .. "
        f"{r['last_seed']} ({r['dropped']} failed, dropped) | {r['action_noise']} | {r['instruction']} |"
        for r in data["sources"]
    )
    success = best.get("success") or {}
    nan = float("nan")
    return render(
        ModelCardData(
            library_name="transformers",
            pipeline_tag=PIPELINE_TAG,
            tags=["rvla-peft", "vision-language-action", "behaviour-cloning", "maniskill", *tasks],
        ),
        BASE_TEMPLATE,
        name=record.get("name") or Path(record["out"]).name,
        tasks=tasks,
        settings=settings,
        parameters_m=f"{record['model']['parameters'] / 1e6:.2f}",
        init=record["model"]["init"],
        policy_file=POLICY_SETTINGS_FILE,
        action_low=json.dumps(settings["action_low"]),
        action_high=json.dumps(settings["action_high"]),
        prompt=repr(settings["prompt_template"]),
        commands="\n".join([*data.get("commands", []), record["command"]]),
        demo_rows=demo_rows,
        args=args,
        dataset=data,
        machine=record["machine"],
        wall_time_min=f"{record['wall_time_s'] / 60:.1f}",
        best=best,
        val_loss=f"{best.get('val_loss', nan):.3f}",
        val_token_acc=f"{100 * best.get('val_token_acc', nan):.1f}",
        val_action_mae=f"{best.get('val_action_mae', nan):.3f}",
        success_rows="\n".join(f"| {task} | {100 * rate:.0f} |" for task, rate in success.items()) or "| - | - |",
        evaluation=(record.get("evaluation") or "").strip(),
    )


OBJECTIVES = {
    "action_tokens": "cross-entropy of the expert's action tokens (teacher-forced)",
    "openvla": "cross-entropy of the expert's action tokens (teacher-forced)",
    "openvla_oft": "OpenVLA-OFT's L1 regression of the expert's action chunk",
    "pi0": "pi0's flow matching (MSE to the velocity noise - actions, t ~ Beta(1.5, 1))",
}


def warmup_card(record: dict, full: bool = False) -> ModelCard:
    """The card of a supervised warm-up (``rvla_peft.sft``), from its ``sft.json`` record."""
    from huggingface_hub import ModelCardData

    cfg, best, data = record["config"], record.get("best") or {}, record["dataset"]
    success = best.get("success") or {}
    base_id = cfg["model"].get("hub_id") or cfg["model"]["name_or_path"]
    return render(
        ModelCardData(
            library_name="transformers" if full else "peft",
            pipeline_tag=PIPELINE_TAG,
            base_model=base_id if is_hub_id(base_id) and not full else None,  # the Hub rejects other ids
            tags=["rvla-peft", "vision-language-action", "behaviour-cloning", "maniskill", *data["tasks"]],
        ),
        WARMUP_TEMPLATE,
        full=full,
        cfg=cfg,
        family=record["family"],
        objective=OBJECTIVES.get(record["family"], record["family"]),
        dataset=data,
        trained_m=f"{record['trained_parameters'] / 1e6:.2f}",
        command=record.get("command") or "",
        best=best,
        val_loss="-" if best.get("val_loss") is None else f"{best['val_loss']:.4f}",
        success_rows="\n".join(f"| {task} | {100 * rate:.0f} |" for task, rate in success.items()) or "| - | - |",
    )


def merged_card(
    name: str, base_id: str, adapter: str, cfg: TrainConfig, dequantized: str | None, oft_heads: bool
) -> ModelCard:
    """The card of a merged export (``rvla_peft.exporting``): what the folder is, what was merged and dropped, how to
    load it."""
    from huggingface_hub import ModelCardData

    family = cfg.policy.family
    return render(
        ModelCardData(
            library_name="transformers",
            base_model=base_id if is_hub_id(base_id) else None,
            pipeline_tag=PIPELINE_TAG,
            tags=["rvla-peft", "vision-language-action", "lora", "merged"],
        ),
        MERGED_TEMPLATE,
        name=name,
        base_id=base_id,
        adapter=adapter,
        family=family,
        torch_dtype=cfg.model.torch_dtype,
        dequantized=dequantized,
        oft_heads=oft_heads,
        heads_file=ACTION_HEADS_FILE,
        recipe_file=RECIPE_FILE,
        policy_file=POLICY_SETTINGS_FILE,
        registers="openvla" in family,
    )


# --------------------------------------------------------------------------------------------------------------
# the cards of what ships in rvla_peft/assets, and their copies in the repository's cards/


@dataclasses.dataclass(frozen=True)
class ShippedAdapter:
    """An adapter folder of ``rvla_peft/assets`` as its card reads it (:class:`AdapterFiles`): the recipe and the
    report lie beside the adapter; the training metrics are not shipped (the curve drawn from them is)."""

    adapter_dir: Path

    @property
    def recipe(self) -> Path:
        return self.adapter_dir / RECIPE_FILE

    @property
    def report_dir(self) -> Path:
        return self.adapter_dir

    def report(self) -> dict:
        return json.loads((self.adapter_dir / REPORT_JSON).read_text())

    def metric_rows(self) -> list[dict]:
        return []


def shipped_cards(files_prefix: str = "") -> dict[str, str]:
    """``{name: card}`` for every base and adapter shipped in ``rvla_peft/assets``, rendered from its own files
    (``pretrain.json``; the adapter's recipe, report and trainer state). ``files_prefix`` is put before the card's
    links to the files beside it (``../rvla_peft/assets/{name}/`` for the copies in ``cards/``)."""
    cards = {}
    for name in PACKAGED:
        record = json.loads((ASSETS_DIR / name / PRETRAIN_RECORD_FILE).read_text())
        cards[name] = str(base_card(record))
    for name in PACKAGED_ADAPTERS:
        folder = ShippedAdapter(ASSETS_DIR / name)
        base_id = json.loads((folder.adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        card = adapter_card(
            folder,
            load_config(folder.recipe),
            repo_id=BUILTIN_PREFIX + name,
            base_id=base_id,
            has_curve=(folder.adapter_dir / CURVE_PNG).is_file(),
            files=files_prefix.format(name=name),
        )
        cards[name] = str(card)
    return cards


def write_shipped_cards(cards_dir: str | Path | None, assets: bool = True) -> list[Path]:
    """Write each shipped card: ``rvla_peft/assets/NAME/README.md`` (when ``assets``) and ``CARDS_DIR/NAME.md``
    (its links pointing into the package), so that both are what :func:`shipped_cards` renders. Returns the files."""
    written = []
    if assets:
        for name, text in shipped_cards().items():
            (ASSETS_DIR / name / CARD_FILE).write_text(text)
            written.append(ASSETS_DIR / name / CARD_FILE)
    if cards_dir is not None:
        cards_dir = Path(cards_dir)
        cards_dir.mkdir(parents=True, exist_ok=True)
        for name, text in shipped_cards(CARDS_LINK_PREFIX).items():
            (cards_dir / f"{name}.md").write_text(text)
            written.append(cards_dir / f"{name}.md")
    return written


if __name__ == "__main__":  # the command lives in rvla_peft/cli/cards.py
    import sys

    from rvla_peft.cli.cards import main

    sys.exit(main())
