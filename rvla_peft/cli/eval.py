"""Robustness report: ``python -m rvla_peft.eval --base MODEL [--adapter PATH_OR_HUB_ID ...] --suite paper``.

Evaluates the base and each adapter on the same grid of perturbation settings with common random numbers
(:mod:`rvla_peft.evaluation`) and writes ``report.json``, ``report.md`` and ``robustness.png`` into ``--out``
(:mod:`rvla_peft.report`); with ``--video K``, side-by-side clips of each setting's first K episodes in
``--out/videos/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rvla_peft.adapters import HubError, adapter_recipe, check_base_match, resolve_adapter
from rvla_peft.config import ConfigError, load_config
from rvla_peft.envs import make_envs
from rvla_peft.envs.maniskill import EnvWorkerError
from rvla_peft.evaluation import build_report, evaluate_grid, record_grid, replay_mismatches, write_videos
from rvla_peft.perturbations import Setting, suite_grid
from rvla_peft.policies.registry import base_model_id, build_policy, load_policy
from rvla_peft.report import render_markdown, write_report
from rvla_peft.rollout import SCHEDULES, ScheduleError
from rvla_peft.utils.commands import portable_command
from rvla_peft.utils.constants import RECIPE_FILE, REPORT_JSON, REPORT_MD, REPORT_PNG, VIDEOS_DIR
from rvla_peft.utils.video import check_installed as check_video_writers

# ------------------------------------------------------------------------------------------------------------------
# the command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rvla_peft.eval",
        description="Robustness report of a base VLA and its adapters under a grid of perturbations.",
    )
    parser.add_argument("--base", help="base model: Hub id, local folder or builtin:NAME (default: the recipe's)")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]PATH_OR_HUB_ID",
        help="an adapter to evaluate (repeatable); NAME labels it in the report",
    )
    parser.add_argument("--no-base", action="store_true", help="evaluate only the adapters, not the bare base")
    parser.add_argument("--recipe", help="recipe giving the policy and env settings (default: the first adapter's)")
    parser.add_argument("--task", help="ManiSkill task (default: the recipe's env.task)")
    parser.add_argument("--suite", default="paper", help="named perturbation suite: paper, full, quick or none")
    parser.add_argument("--perturb", action="append", default=[], metavar="NAME@SEVERITY", help="add a setting")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per policy and setting")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="episode e starts from reset seed SEED + e (CPU envs: the initial state of a single env reset with "
        "it, at any --num-envs; GPU envs: ManiSkill draws each batch's initial states from its first seed, so "
        "GPU reports pair only at the same --num-envs, and never with CPU reports)",
    )
    parser.add_argument(
        "--num-envs",
        type=int,
        help="parallel envs (default: the recipe's env.num_envs); with --schedule batch the perturbation draws "
        "depend on it, so reports pair episode for episode only at the same number",
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="batch",
        help="batch: the envs play their episodes in lockstep batches (the draws depend on --num-envs); stream: "
        "each env starts the next episode as soon as it finishes one (no idle envs; the draws follow each "
        "episode's seed, so reports pair at any --num-envs; CPU envs and one action per step)",
    )
    parser.add_argument(
        "--video",
        type=int,
        default=0,
        metavar="K",
        help="also record the first K episodes of every setting, the policies side by side on the same episode: an "
        "MP4 and a GIF per setting under OUT/videos/, linked from report.md (played again after the grid, so the "
        "grid runs as fast as without; needs the video extra)",
    )
    parser.add_argument("--sample", action="store_true", help="sample actions instead of taking the most likely")
    parser.add_argument("--out", default="report", help="output folder for report.json, report.md, robustness.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    parser.add_argument(
        "--allow-base-mismatch", action="store_true", help="evaluate an adapter whose recorded base differs"
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. env.image_size=128")
    return parser.parse_intermixed_args(argv)


def _adapter_args(values: list[str]) -> list[tuple[str, str]]:
    named = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or "/" in name or Path(value).exists():
            name, path = Path(value.rstrip("/")).name or value, value
            if name == "adapter":  # OUTPUT/adapter: name it after the run folder
                name = Path(value.rstrip("/")).parent.name or name
        named.append((name, path))
    names = [n for n, _ in named]
    if len(set(names)) != len(names) or "base" in names:
        raise ValueError(f"adapter names must be unique and not 'base', got {names}: label them NAME=PATH")
    return named


def _recipe_of(adapter: Path) -> Path | None:
    try:
        return adapter_recipe(adapter)
    except HubError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        named = _adapter_args(args.adapter)  # [(name, path or Hub id as given)]
        if args.no_base and not named:
            raise ValueError("--no-base with no --adapter leaves nothing to evaluate")
        if args.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
        if not 0 <= args.video <= args.episodes:
            raise ValueError(f"--video must be between 0 and --episodes ({args.episodes}), got {args.video}")
        if args.video:
            check_video_writers()
        if (out / REPORT_JSON).exists() and not args.overwrite:
            raise ValueError(f"{out / REPORT_JSON} exists; choose another --out or pass --overwrite")
        # Hub ids are downloaded here (only the adapter's files), so that a wrong id fails before any model loads.
        local = [resolve_adapter(given) for _, given in named]
        recipe = args.recipe or next((r for path in local if (r := _recipe_of(path))), None)
        if recipe is None and args.base and (Path(args.base) / RECIPE_FILE).is_file():
            recipe = Path(args.base) / RECIPE_FILE  # a merged export (python -m rvla_peft.export) carries its recipe
        overrides = list(args.overrides)
        if args.base:
            overrides.append(f"model.name_or_path={args.base}")
        if args.task:
            overrides.append(f"env.task={args.task}")
        if args.num_envs:
            overrides.append(f"env.num_envs={args.num_envs}")
        cfg = load_config(recipe, overrides)
        settings = suite_grid(None if args.suite == "none" else args.suite, args.perturb)
        for path, (_, given) in zip(local, named, strict=True):
            check_base_match(path, base_model_id(cfg.model), allow=args.allow_base_mismatch, adapter_name=given)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        env = make_envs(cfg.env, device=device)  # before any model loads: a bad task fails in seconds
        if not env.initial_state_per_seed:
            print(
                f"note: GPU envs draw each batch's initial states from its first seed: this report pairs with others "
                f"at --num-envs {env.num_envs} on GPU envs only",
                file=sys.stderr,
            )
        if args.schedule == "stream" and not env.can_queue_episodes:
            env.close()
            raise ValueError("--schedule stream needs CPU envs (env.sim_backend=physx_cpu); GPU envs use batch")
    except (ConfigError, ValueError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = portable_command("python -m rvla_peft.eval", sys.argv[1:] if argv is None else argv)
    try:
        report = run(cfg, env, named, local, settings, args, command, out)
    except EnvWorkerError as e:  # a dead env worker (env.restart_dead_workers=false): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ScheduleError as e:  # --schedule stream with a policy acting in chunks
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        env.close()
    write_report(report, out)
    print(render_markdown(report))
    print(f"Report written to {out}/ ({REPORT_JSON}, {REPORT_MD}, {REPORT_PNG})")
    return 0


def run(
    cfg, env, named: list[tuple[str, str]], local: list[Path], settings: list[Setting], args, command: str, out: Path
):
    """Load the policies (base first) and evaluate the grid (with ``--video K``, then record the first K episodes
    of each setting into ``out``); returns the report dict."""
    policies, described = {}, []
    if not args.no_base:
        # the raw base, also for a recipe that starts RL from a warm-up (model.adapter): evaluate a warm-up as an
        # adapter of its own (--adapter warmup=PATH)
        raw = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adapter=None))
        policies["base"] = build_policy(raw, device=env.device)
        described.append({"name": "base", "base": base_model_id(cfg.model), "adapter": None})
    for (name, given), path in zip(named, local, strict=True):
        if _recipe_of(path) is None:  # no recipe beside it: the evaluation recipe's policy settings
            policies[name] = build_policy(cfg, adapter=path, device=env.device)
        else:  # the policy settings it was trained with, on the evaluated base (checked in main)
            policies[name] = load_policy(cfg.model, path, env.device, allow_base_mismatch=True)
        described.append({"name": name, "base": base_model_id(cfg.model), "adapter": given})
    for policy in policies.values():
        policy.eval()
    deterministic = not args.sample
    with contextlib.ExitStack() as stack:
        if "base" in policies:
            # The base's adapter is fresh (LoRA B = 0: it changes no output bit) and costs a third of each act of a
            # small model on the CPU: switched off, as for the KL to the base.
            stack.enter_context(policies["base"].peft_model.disable_adapter())
        for policy in policies.values():  # each adapter folded into its model's weights (policy.merge_lora_to_act)
            stack.enter_context(policy.acting())
        with tqdm(total=len(policies) * len(settings) * args.episodes, desc="episodes", unit="ep") as bar:
            results = evaluate_grid(
                policies,
                env,
                settings,
                args.episodes,
                args.seed,
                cfg.env.max_episode_steps,
                deterministic,
                bar.update,
                schedule=args.schedule,
            )
        videos = None
        if args.video:
            recorded = record_grid(
                policies, env, settings, args.video, args.seed, cfg.env.max_episode_steps, deterministic, args.schedule
            )
            for cell in replay_mismatches(results, recorded):  # the same episodes, so never expected
                print(f"warning: the recorded episodes of {cell} ended unlike in the grid", file=sys.stderr)
            videos = write_videos(recorded, out, VIDEOS_DIR, args.seed)
    return build_report(
        results,
        settings,
        described,
        task=cfg.env.task,
        suite=args.suite,
        episodes=args.episodes,
        seed=args.seed,
        deterministic=deterministic,
        command=command,
        schedule=args.schedule,
        videos=videos,
    )


if __name__ == "__main__":
    sys.exit(main())
