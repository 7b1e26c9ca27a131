"""Share a robust adapter on the Hugging Face Hub: a model card, one-commit pushes, and loading it back.

    python -m rvla_peft.hub push outputs/run --repo-id user/robust-pickcube [--private] [--revision BRANCH]
    python -m rvla_peft.hub card outputs/run [--out DIR]     # the exact folder `push` would upload, locally

A push uploads, in ONE commit: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, safetensors
only), the value head, the resolved ``recipe.yaml``, the robustness report (``report.json``, ``report.md``,
``robustness.png`` from ``OUTPUT/report`` or ``--report DIR``), the training curve drawn from ``metrics.jsonl``,
and a model card (``README.md``) whose ``model-index`` holds the success rate under each evaluated setting.
Everything is staged in a temporary folder first: the run folder is only read, so a failed push changes nothing
locally. The pushed ``adapter_config.json`` names the base by its Hub id, never by a local path.

The token comes from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``); it is never written to a
file, a log line or an error message. Network errors and 5xx answers are retried with exponential backoff.

``load_policy`` (in :mod:`rvla_peft.policies.registry`) uses :func:`resolve_adapter` and
:func:`check_base_match` to rebuild the trained policy from a Hub id or a folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from rvla_peft.eval import REPORT_JSON, REPORT_MD, REPORT_PNG
from rvla_peft.policies.base import ACTION_HEADS_FILE, VALUE_HEAD_FILE
from rvla_peft.trainer import ADAPTER_DIR, METRICS_FILE, RECIPE_FILE, atomic_save

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard

    from rvla_peft.config import ModelConfig, TrainConfig

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_DIR = "report"  # where push looks for rvla_peft.eval's --out folder by default: OUTPUT/report
CURVE_PNG = "training_curve.png"
CARD_FILE = "README.md"
TRAINER_STATE = "trainer_state.json"
# The files a policy is rebuilt from; the rest of a pushed repo (card, plots, report) is for people.
POLICY_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, VALUE_HEAD_FILE, ACTION_HEADS_FILE, RECIPE_FILE)
TEMPLATE = Path(__file__).resolve().parent.parent / "cards" / "adapter_card.md"
PIPELINE_TAG = "robotics"
BASE_TAGS = ("lora", "robustness", "rvla-peft")
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
RETRIES, BACKOFF_S = 3, 2.0  # a failed request is retried after 2, 4 and 8 s

T = TypeVar("T")


class HubError(RuntimeError):
    """A push or a download that cannot go on; the message names the problem and the fix."""


class BaseMismatchError(ValueError):
    """An adapter loaded on a base other than the one it was trained on."""


# ------------------------------------------------------------------------------------------------------------------
# what a run folder holds


@dataclass
class RunFiles:
    """The files of one training run that a push reads (never writes)."""

    output_dir: Path
    adapter_dir: Path
    recipe: Path
    metrics: Path | None
    report_dir: Path | None

    @classmethod
    def find(
        cls, path: str | Path, adapter_dir: str | Path | None = None, report_dir: str | Path | bool | None = None
    ) -> RunFiles:
        """``path`` is a run's output_dir (the adapter in ``path/adapter``) or an adapter / checkpoint folder.

        ``report_dir``: None looks for ``OUTPUT/report``; False means no report (a checkpoint is not what was
        evaluated).
        """
        path = Path(path)
        if adapter_dir is not None:
            adapter, output = Path(adapter_dir), path
        elif (path / ADAPTER_CONFIG).is_file():  # an adapter or checkpoint folder: the run is above it
            adapter = path
            candidates = (path.parent, path.parent.parent)
            output = next((d for d in candidates if (d / RECIPE_FILE).is_file()), path.parent)
        else:
            adapter, output = path / ADAPTER_DIR, path
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise HubError(
                f"no adapter in {path}: expected {adapter / ADAPTER_CONFIG} (training writes OUTPUT/{ADAPTER_DIR}/); "
                "pass a run's output_dir or an adapter folder"
            )
        recipe = next((d / RECIPE_FILE for d in (adapter, output) if (d / RECIPE_FILE).is_file()), None)
        if recipe is None:
            raise HubError(
                f"no {RECIPE_FILE} in {adapter} or {output}: the card and load_policy need the recipe the adapter "
                "was trained with (training writes it beside the adapter)"
            )
        if report_dir is False:
            report = None
        elif report_dir is not None and report_dir is not True:
            report = Path(report_dir)
            if not (report / REPORT_JSON).is_file():
                raise HubError(
                    f"--report {report}: no {REPORT_JSON} there; run `python -m rvla_peft.eval ... --out DIR`"
                )
        else:
            report = output / REPORT_DIR if (output / REPORT_DIR / REPORT_JSON).is_file() else None
        metrics = output / METRICS_FILE if (output / METRICS_FILE).is_file() else None
        return cls(output, adapter, recipe, metrics, report)

    @cached_property
    def cfg(self) -> TrainConfig:
        """The resolved recipe the adapter was trained with."""
        from rvla_peft.config import ConfigError, load_config

        try:
            return load_config(self.recipe)
        except ConfigError as e:
            raise HubError(f"{self.recipe}: {e}") from None

    def report(self) -> dict | None:
        return json.loads((self.report_dir / REPORT_JSON).read_text()) if self.report_dir else None

    def metric_rows(self) -> list[dict]:
        if self.metrics is None:
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------------------
# the base model's id


def _is_local_path(name: str) -> bool:
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).exists()
    )


def is_hub_id(name: str | None) -> bool:
    """A model id on the Hub ('org/name' or a canonical 'name'), not a builtin model or a local folder."""
    if not name or ":" in name or _is_local_path(name):
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def resolve_base_id(recorded: str | None, model_cfg: ModelConfig, override: str | None = None) -> str:
    """The id the pushed adapter_config.json names as its base: others must be able to load it.

    PEFT records whatever path the base was loaded from; a local folder means nothing on another machine, so it is
    replaced by ``model.hub_id`` from the recipe, or refused.
    """
    if override:
        return override
    if recorded and not _is_local_path(recorded):
        return recorded
    if model_cfg.hub_id:
        return model_cfg.hub_id
    raise HubError(
        f"the adapter's base_model_name_or_path is the local path {recorded!r}, which nobody else can load: set "
        "model.hub_id in the recipe to the base's Hub id (e.g. model.hub_id=openvla/openvla-7b) and save again, "
        "or pass --base-id ORG/NAME"
    )


# ------------------------------------------------------------------------------------------------------------------
# the robustness report -> card metadata and tables


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
    """Markdown: per setting, the adapter's success (95% CI), the base's, and the paired difference (95% CI)."""
    baseline = _baseline(report, policy)
    ours, theirs = _results(report, policy), _results(report, baseline)
    paired = {p["setting"]: p for p in report.get("paired", []) if p["policy"] == policy}
    head = f"| setting | {policy}: success [95% CI] | mean return |"
    rule = "|---|---|---|"
    if baseline:
        head += f" {baseline}: success | difference [95% CI] |"
        rule += "---|---|"
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
        rows.append(row)
    return "\n".join(rows)


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
    from rvla_peft.envs.perturbations import PERTURBATIONS

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


# ------------------------------------------------------------------------------------------------------------------
# training curve


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


# ------------------------------------------------------------------------------------------------------------------
# the card


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
    """The model card: metadata (peft, base, robotics, tags, model-index) and the body from ``cards/``."""
    from huggingface_hub import ModelCard

    report = run.report()
    policy = select_policy(report, run.adapter_dir, repo_id, policy) if report else None
    template = Path(template) if template else TEMPLATE
    if not template.is_file():
        raise HubError(f"card template {template} not found (it ships in the repository's cards/ folder)")
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
        base_builtin=base_id.startswith("builtin:"),
        task=cfg.env.task,
        cfg=cfg,
        train_perturbations=", ".join(f"`{s.name}@{s.severity:g}`" for s in cfg.perturb.train) or "none",
        lora_targets=cfg.lora.target_modules
        if isinstance(cfg.lora.target_modules, str)
        else ", ".join(cfg.lora.target_modules),
        jacobian=f"alpha = {regs.jacobian.weight:g} ({regs.jacobian.form})" if regs.jacobian.weight else "off",
        smoothness=f"beta = {regs.smoothness.weight:g} ({regs.smoothness.form})" if regs.smoothness.weight else "off",
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
    )


# ------------------------------------------------------------------------------------------------------------------
# staging: the exact folder a push uploads


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


# ------------------------------------------------------------------------------------------------------------------
# push


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_network_error(error: BaseException) -> bool:
    """Connection refused or reset, DNS, timeouts: the HTTP client's transport errors (httpx2 from
    huggingface_hub 2, httpx before)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return isinstance(error, httpx.TransportError)


def _is_transient(error: BaseException) -> bool:
    return _is_network_error(error) or _status(error) in _TRANSIENT_STATUS


def _with_retries(action: Callable[[], T], what: str, retries: int, backoff_s: float) -> T:
    """``action()``, retried with exponential backoff on network errors and 408/429/5xx answers."""
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as error:
            if not _is_transient(error) or attempt == retries:
                raise
            wait = backoff_s * 2**attempt
            logger.warning("%s failed (%s); retry %d/%d in %.1f s", what, _describe(error), attempt + 1, retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _describe(error: BaseException) -> str:
    status = _status(error)
    if status is None:
        return f"{type(error).__name__}: {error}".splitlines()[0]
    message = getattr(error, "server_message", None) or ""
    return f"HTTP {status}" + (f": {message.strip()}" if message.strip() else "")


def _hub_error(error: BaseException, repo_id: str, user: str | None, attempts: int) -> HubError:
    """A clear message for a failed push; the token never appears in it (errors carry no request headers)."""
    from huggingface_hub import constants

    status = _status(error)
    untouched = "No commit was made and the local files are unchanged."
    if _is_network_error(error):
        return HubError(
            f"could not reach the Hub at {constants.ENDPOINT} after {attempts} attempts ({_describe(error)}): check "
            f"the network or HF_ENDPOINT, then run the push again. {untouched}"
        )
    if status == 401:
        return HubError(
            f"the Hub ({constants.ENDPOINT}) rejected your token (401): log in again with `hf auth login` or set "
            f"HF_TOKEN to a token with write access. {untouched}"
        )
    if status == 403:
        namespace, name = repo_id.split("/")[0], repo_id.split("/")[-1]
        return HubError(
            f"{user or 'you'} may not write to {repo_id} (403 Forbidden: {_describe(error)}): the repo belongs to "
            f"'{namespace}', or your token is read-only. Push to a repo of your own "
            f"(--repo-id {user or 'USER'}/{name}) or use a write token of '{namespace}'. {untouched}"
        )
    if status in _TRANSIENT_STATUS:
        return HubError(
            f"the Hub at {constants.ENDPOINT} failed to take the push to {repo_id} after {attempts} attempts "
            f"({_describe(error)}): try again later (https://status.huggingface.co). {untouched}"
        )
    return HubError(f"push to {repo_id} failed ({_describe(error)}). {untouched}")


def _token(token: str | None) -> str:
    from huggingface_hub import constants, get_token

    token = token or get_token()
    if not token:
        raise HubError(
            f"not logged in to the Hugging Face Hub ({constants.ENDPOINT}): run `hf auth login` or set HF_TOKEN to "
            "a token with write access, then push again"
        )
    return token


def _whoami(api: HfApi, retries: int, backoff_s: float) -> str:
    try:
        return _with_retries(lambda: api.whoami()["name"], "whoami", retries, backoff_s)
    except Exception as error:
        raise _hub_error(error, "your account", None, retries + 1) from None


def push_adapter(
    path: str | Path,
    repo_id: str,
    *,
    adapter_dir: str | Path | None = None,
    report_dir: str | Path | bool | None = None,
    policy: str | None = None,
    private: bool = False,
    revision: str | None = None,
    base_id: str | None = None,
    commit_message: str | None = None,
    checkpoint_update: int | None = None,
    token: str | None = None,
    retries: int | None = None,
    backoff_s: float | None = None,
) -> CommitInfo:
    """Push a run's adapter, value head, card, report, training curve and recipe to ``repo_id`` in one commit.

    ``path`` is a run's output_dir (or an adapter folder). ``repo_id`` without a namespace goes under the logged-in
    user. ``revision`` is a branch, created from main when missing. ``report_dir`` is the eval's ``--out`` folder
    (default ``OUTPUT/report`` when it exists; False: no report); ``policy`` names the report's policy that is this
    adapter. Files are staged in a temporary folder, so the run folder is never modified, even when the push fails.
    Raises :class:`HubError` with the fix on failure; ``retries`` / ``backoff_s`` default to RETRIES / BACKOFF_S.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    retries = RETRIES if retries is None else retries
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    run = RunFiles.find(path, adapter_dir=adapter_dir, report_dir=report_dir)
    adapter_config = json.loads((run.adapter_dir / ADAPTER_CONFIG).read_text())
    base_id = resolve_base_id(adapter_config.get("base_model_name_or_path"), run.cfg.model, base_id)
    api = HfApi(token=_token(token))
    user = _whoami(api, retries, backoff_s)
    repo_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    with tempfile.TemporaryDirectory(prefix="rvla_peft_push_") as tmp:
        staging = Path(tmp)
        files = stage(
            run,
            staging,
            repo_id=repo_id,
            base_id=base_id,
            policy=policy,
            revision=revision,
            checkpoint_update=checkpoint_update,
        )
        size = sum((staging / f).stat().st_size for f in files)
        target = f"{repo_id}@{revision}" if revision else repo_id
        logger.info("Pushing %d files (%.1f kB) to %s in one commit: %s", len(files), size / 1e3, target, files)
        message = commit_message or f"Upload robust LoRA adapter ({run.cfg.env.task})"

        def upload() -> CommitInfo:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(staging / f)) for f in files]
            return api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision)

        try:
            info = _with_retries(upload, f"push to {target}", retries, backoff_s)
        except Exception as error:
            raise _hub_error(error, repo_id, user, retries + 1) from None
    logger.info("Pushed %s: %s", target, info.commit_url)
    return info


def push_training_output(cfg: TrainConfig, directory: str | Path, *, checkpoint: bool = False) -> CommitInfo | None:
    """The trainer's hook (``hub.push_to_hub`` / ``hub.push_checkpoints``): push ``directory`` as ``cfg.hub`` says.

    A checkpoint goes to ``hub.checkpoint_revision`` and a failure there only warns (a network blip must not stop a
    long run); a failure of the final push raises, naming the command that retries it.
    """
    hub, output = cfg.hub, Path(cfg.output_dir)
    if checkpoint:
        state = Path(directory) / TRAINER_STATE
        update = json.loads(state.read_text())["update"] if state.is_file() else None
        try:
            return push_adapter(
                output,
                hub.repo_id,
                adapter_dir=directory,
                report_dir=False,  # OUTPUT/report, if any, evaluated another adapter
                private=hub.private,
                revision=hub.checkpoint_revision,
                commit_message=f"Checkpoint at update {update}/{cfg.total_updates}",
                checkpoint_update=update,
            )
        except Exception as e:  # whatever went wrong, the run itself must go on
            logger.warning("checkpoint push failed; training goes on: %s", e)
            return None
    try:
        return push_adapter(
            output,
            hub.repo_id,
            adapter_dir=directory,
            private=hub.private,
            revision=hub.revision,
            commit_message=f"Upload robust LoRA adapter ({cfg.env.task}, {cfg.total_updates} PPO updates)",
        )
    except HubError as e:
        raise HubError(
            f"training finished and the adapter is saved in {directory}, but the push failed: {e}\n"
            f"Push it again with: python -m rvla_peft.hub push {output} --repo-id {hub.repo_id}"
            + (f" --revision {hub.revision}" if hub.revision else "")
        ) from None


# ------------------------------------------------------------------------------------------------------------------
# load


def resolve_adapter(adapter: str | Path, *, revision: str | None = None, token: str | None = None) -> Path:
    """A local adapter folder as it is; a Hub id downloaded (only the files a policy needs) into the HF cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    path = Path(adapter).expanduser()
    if path.is_dir():
        return path
    try:
        validate_repo_id(str(adapter))
    except HFValidationError:
        raise HubError(f"adapter {str(adapter)!r} is neither a folder nor a Hub repo id like 'user/name'") from None
    try:
        return Path(snapshot_download(str(adapter), revision=revision, allow_patterns=list(POLICY_FILES), token=token))
    except RevisionNotFoundError:
        raise HubError(f"adapter {adapter}: the Hub repo has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"adapter {adapter!r}: no such folder, and no Hub repo of that name you can read at {constants.ENDPOINT} "
            "(for a private repo, log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"adapter {adapter!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE=1, or no network): download it once online"
        ) from None


def adapter_recipe(adapter_dir: Path) -> Path:
    """The recipe an adapter was trained with: beside it (OUTPUT/adapter, pushed repos) or in the run folder."""
    for d in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent):
        if (d / RECIPE_FILE).is_file():
            return d / RECIPE_FILE
    raise HubError(
        f"no {RECIPE_FILE} beside the adapter in {adapter_dir}: load it with "
        "rvla_peft.policies.build_policy(cfg, adapter=...) and the config it was trained with"
    )


def with_base(model_cfg: ModelConfig, base: str | ModelConfig | None) -> ModelConfig:
    """The recipe's model section with ``base`` swapped in; None keeps the recipe's base (its Hub id when the
    recipe's path was local to the machine that trained it)."""
    from rvla_peft.config import ModelConfig

    if isinstance(base, ModelConfig):
        return base
    if base is None:
        if model_cfg.hub_id and not Path(model_cfg.name_or_path).exists():
            return replace(model_cfg, name_or_path=model_cfg.hub_id)
        return model_cfg
    if base in (model_cfg.name_or_path, model_cfg.hub_id):
        return replace(model_cfg, name_or_path=base)
    return replace(model_cfg, name_or_path=base, hub_id=None, revision=None)


def check_base_match(adapter_dir: Path, base_id: str, *, allow: bool = False, adapter_name: str | None = None) -> None:
    """An adapter trained on another base gives garbage actions without any error: refuse unless ``allow``."""
    recorded = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if allow or not recorded or recorded == base_id:
        return
    raise BaseMismatchError(
        f"adapter {adapter_name or adapter_dir} was trained on base {recorded!r}, not {base_id!r}: load it on "
        f"{recorded!r} (base=None takes the recipe's), or pass allow_base_mismatch=True (--allow-base-mismatch) "
        "if both names are the same weights"
    )


# ------------------------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rvla_peft.hub", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("push", "push a run to the Hub in one commit"), ("card", "stage the upload locally")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("output_dir", help="a training run's output_dir (or an adapter folder)")
        p.add_argument("--report", help="folder with report.json (default: OUTPUT_DIR/report if present)")
        p.add_argument("--policy", help="the report's policy that is this adapter (default: found by its path)")
        p.add_argument("--base-id", help="Hub id of the base, when the adapter recorded a local path")
        if name == "push":
            p.add_argument("--repo-id", required=True, help="'user/name', or 'name' under the logged-in user")
            p.add_argument("--private", action="store_true", help="create the repo private")
            p.add_argument("--revision", help="branch to push to (created from main if missing)")
            p.add_argument("--commit-message")
        else:
            p.add_argument("--repo-id", help="repo id the card's snippets name (default: YOUR_USER/<run name>)")
            p.add_argument("--out", help="folder to write (default: OUTPUT_DIR/card); replaced if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Progress lines of this module only (not every HTTP request of the client), for this command's duration.
    handler, level = logging.StreamHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        if args.command == "push":
            info = push_adapter(
                args.output_dir,
                args.repo_id,
                report_dir=args.report,
                policy=args.policy,
                private=args.private,
                revision=args.revision,
                base_id=args.base_id,
                commit_message=args.commit_message,
            )
            print(info.commit_url)
            return 0
        run = RunFiles.find(args.output_dir, report_dir=args.report)
        repo_id = args.repo_id or f"YOUR_USER/{run.output_dir.resolve().name}"
        out = Path(args.out) if args.out else run.output_dir / "card"
        with tempfile.TemporaryDirectory(prefix="rvla_peft_card_") as tmp:  # a failed card leaves nothing behind
            files = stage(run, Path(tmp), repo_id=repo_id, base_id=args.base_id, policy=args.policy)
            atomic_save(out, lambda dst: shutil.copytree(tmp, dst, dirs_exist_ok=True))
        print(f"wrote {out}/: {', '.join(files)}")
        return 0
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
