"""The chain a user runs, for every policy family, on the CPU with the same commands as on a GPU:

    scripted PushCube demonstrations -> warm-up (rvla-sft) -> clean success on fresh episodes -> 10 updates of
    robust RL from the warm-up (rvla-train) -> robustness report (rvla-eval) -> merged export (rvla-export) -> card

for OpenVLA's token head (``openvla``), OpenVLA-OFT's regression head (``openvla_oft``) and pi0's flow matching
(``pi0``). Each family's architecture is its tiny builtin (``builtin:tiny-openvla``, ``builtin:tiny-pi0``) widened
as the shipped base was (128 wide, 4 text layers, 8-pixel patches: the builtins' 16-pixel patches leave a 4x4 grid
at 64x64); its weights are random, so the warm-up trains every weight (``full_finetune``: a LoRA on random weights
is not what a warm-up of a real checkpoint is), and robust RL then trains a LoRA on the warmed-up model, the
warm-up itself being the KL anchor and the invariance teacher.

    OMP_NUM_THREADS=1 python bench/warmup_chain.py --out bench/results/warmup_chain
    python bench/warmup_chain.py --smoke --out /tmp/chain      # every stage in about a minute, no success bar

Every stage is one of the package's commands, called in this process; a stage whose output exists is skipped, so
the script resumes after an interruption. ``OUT/results.json`` and ``OUT/README.md`` collect the numbers; each
command is recorded there as it would be typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TASK = "PushCube-v1"
# Reset seeds: demonstrations 10000+ (clean) and 20000+ (DART), the warm-up's own closed-loop checks 1000000+,
# and this chain's evaluation 500000+, which no demonstration, study or warm-up check used.
EVAL_SEED = 500_000
RL_PERTURBATION = "color_jitter@0.5"  # the robust RL step's training perturbation (recipes/tiny_demo.yaml's)


@dataclass
class Scale:
    """How much of everything: the full run, or the smoke test's few steps."""

    sizes: dict = field(default_factory=dict)  # the architecture's widths (the builtins' own when empty)
    demos: dict = field(default_factory=lambda: {"clean": (300, 10_000, 0.0), "dart": (300, 20_000, 0.5)})
    sft: dict = field(default_factory=dict)
    rl: list = field(default_factory=list)
    eval_episodes: int = 100
    eval_envs: int = 10


FULL = Scale(
    sizes=dict(patch_size=8, hidden_size=128, num_layers=4, vision_hidden_size=128, vision_layers=2),
    sft=dict(
        max_steps=2000,
        batch_size=32,
        learning_rate=1e-3,
        warmup_steps=100,
        weight_decay=0.05,
        random_crop=2,
        val_fraction=0.05,
        eval_every=250,
        eval_episodes=20,
        save_every=250,
    ),  # fmt: skip
    rl=["total_updates=10"],
)
SMOKE = Scale(
    demos={"clean": (3, 10_000, 0.0)},
    sft=dict(max_steps=2, batch_size=4, learning_rate=1e-3, val_fraction=0.0, eval_every=0, eval_episodes=0),
    rl=["total_updates=1", "ppo.num_steps=8", "ppo.update_epochs=1", "env.max_episode_steps=8"],
    eval_episodes=2,
    eval_envs=2,
)

# Each family's policy keys (the same in the warm-up, RL and evaluation: they travel in the warm-up's recipe.yaml).
# The instruction alone as the prompt: the tiny models read text a character per token.
FAMILIES = {
    "openvla": {"builder": "build_tiny_openvla", "policy": {"family": "openvla"}},
    "openvla_oft": {"builder": "build_tiny_openvla", "policy": {"family": "openvla_oft", "chunk_size": 4}},
    "pi0": {"builder": "build_tiny_pi0", "policy": {"family": "pi0", "execute_steps": 4}},
}
PROMPT = "{instruction}"


def run(name: str, main, argv: list[str], log: list) -> float:
    """One command, in this process; its typed form goes to ``log``. Returns its wall time."""
    print(f"\n$ {name} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    code = main(argv)
    if code:
        raise SystemExit(f"{name} failed with exit status {code}")
    seconds = round(time.perf_counter() - start, 1)
    log.append({"command": f"{name} {shlex.join(argv)}", "seconds": seconds})
    return seconds


def record_demos(out: Path, scale: Scale, log: list) -> list[Path]:
    from rvla_peft.cli.demos import main as demos

    folders = []
    for name, (episodes, seed, noise) in scale.demos.items():
        folder = out / "demos" / name
        if not (folder / "index.json").is_file():
            argv = ["--task", TASK, "--episodes", str(episodes), "--seed", str(seed), "--out", str(folder),
                    "--image-size", "64", "--num-envs", "4", "--overwrite"]  # fmt: skip
            if noise:
                argv += ["--action-noise", str(noise)]
            run("rvla-demos", lambda a: demos(a) or 0, argv, log)
        folders.append(folder)
    return folders


def build_base(family: str, folder: Path, scale: Scale) -> Path:
    """The family's architecture with random weights, as a ``from_pretrained`` folder."""
    from rvla_peft.models import tiny

    if not (folder / "config.json").is_file():
        getattr(tiny, FAMILIES[family]["builder"])(folder, seed=0, image_size=64, **scale.sizes)
    return folder


def sft_recipe(family: str, base: Path, demos: list[Path], out: Path, scale: Scale) -> dict:
    policy = {**FAMILIES[family]["policy"], "prompt_template": PROMPT}
    return {
        "demos": [str(d) for d in demos],
        "output_dir": str(out),
        "seed": 0,
        "full_finetune": True,
        **scale.sft,
        "model": {"name_or_path": str(base)},
        "policy": policy,
        "lora": {"target_modules": None},  # the family's default modules (the LoRA RL attaches later)
        "env": {"task": TASK, "num_envs": 4, "image_size": 64, "max_episode_steps": 50},
    }


def rl_recipe(warmup_recipe: Path, out: Path, scale: Scale) -> dict:
    """recipes/tiny_demo.yaml's training under colour jitter with PPO and the invariance penalty to the warm-up (the
    configuration docs/warm-up.md measured, not the demo's distillation), the KL to the warm-up on clean frames,
    with the warmed-up model as the base and the warm-up's policy, LoRA and env sections."""
    recipe = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / "tiny_demo.yaml").read_text())
    warm = yaml.safe_load(warmup_recipe.read_text())
    # the exact KL needs a token distribution; the continuous families sample theirs
    form = "exact" if warm["policy"]["family"] in ("action_tokens", "openvla") else "sampled"
    recipe["algorithm"] = "ppo"
    recipe["regularizers"]["invariance"] = {"weight": 1.0, "form": form, "fraction": 0.5, "target": "base"}
    recipe.update({k: warm[k] for k in ("model", "policy", "lora")}, output_dir=str(out), report_to=[])
    recipe["env"] = {**warm["env"], "num_envs": 2, "reward_mode": "sparse"}
    recipe["lora"].update(r=8, alpha=16)
    return recipe


def report_rows(report: dict) -> dict:
    rows = {(r["policy"], r["setting"]): r for r in report["results"]}
    out = {f"{p}/{s}": {"success": r["success_rate"], "ci95": r["ci95"], "episodes": r["episodes"]}
           for (p, s), r in rows.items()}  # fmt: skip
    for pair in report.get("paired", []):
        out[f"{pair['policy']}-{pair['baseline']}/{pair['setting']}"] = {
            "difference": pair["difference"], "ci95": pair["ci95"], "p_mcnemar": pair["p_mcnemar"]}  # fmt: skip
    return out


def chain(family: str, out: Path, demos: list[Path], scale: Scale) -> dict:
    from rvla_peft.cli.eval import main as evaluate
    from rvla_peft.cli.export import main as export
    from rvla_peft.cli.sft import main as sft
    from rvla_peft.cli.train import main as train

    root = out / family
    root.mkdir(parents=True, exist_ok=True)
    results_file = root / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"family": family, "commands": []}
    log = results["commands"]

    def save():
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    from safetensors.torch import load_file

    base = build_base(family, root / "base", scale)
    results["parameters"] = sum(t.numel() for t in load_file(str(base / "model.safetensors")).values())
    results["sizes"] = scale.sizes or "the builtin's"

    # 1. the warm-up
    warm = root / "warmup"
    recipe_file = root / "sft_recipe.yaml"
    if not (warm / "sft.json").is_file():
        recipe_file.write_text(yaml.safe_dump(sft_recipe(family, base, demos, warm, scale), sort_keys=False))
        resume = ["resume_from_checkpoint=latest"] if (warm / "checkpoint").is_dir() else ["overwrite_output_dir=true"]
        run("rvla-sft", sft, [str(recipe_file), *resume], log)
    record = json.loads((warm / "sft.json").read_text())
    results["warmup"] = {"best": record["best"], "history": record["history"], "wall_time_s": record["wall_time_s"],
                         "trained_parameters": record["trained_parameters"], "dataset": record["dataset"]}  # fmt: skip
    save()
    model = warm / "model"

    # 2. its clean success on fresh episodes (deterministic actions)
    report = root / "report-warmup"
    if not (report / "report.json").is_file():
        run("rvla-eval", evaluate, ["--recipe", str(model / "recipe.yaml"), "--suite", "none", "--episodes",
            str(scale.eval_episodes), "--seed", str(EVAL_SEED), "--num-envs", str(scale.eval_envs), "--out",
            str(report), "--overwrite", "env.vectorization=async"], log)  # fmt: skip
    results["warmup_eval"] = report_rows(json.loads((report / "report.json").read_text()))
    save()

    # 3. robust RL from it
    rl = root / "rl"
    rl_file = root / "rl_recipe.yaml"
    if not (rl / "adapter" / "adapter_config.json").is_file():
        rl_file.write_text(yaml.safe_dump(rl_recipe(model / "recipe.yaml", rl, scale), sort_keys=False))
        resume = ["resume_from_checkpoint=latest"] if (rl / "checkpoints").is_dir() else ["overwrite_output_dir=true"]
        run("rvla-train", train, [str(rl_file), *scale.rl, *resume], log)

    # 4. the robustness report: the warm-up against its RL adapter, clean and under the RL perturbation
    report = root / "report-rl"
    if not (report / "report.json").is_file():
        run("rvla-eval", evaluate, ["--adapter", f"robust={rl / 'adapter'}", "--suite", "none", "--perturb",
            RL_PERTURBATION, "--episodes", str(scale.eval_episodes), "--seed", str(EVAL_SEED), "--num-envs",
            str(scale.eval_envs), "--out", str(report), "--overwrite", "env.vectorization=async"], log)  # fmt: skip
    results["rl_eval"] = report_rows(json.loads((report / "report.json").read_text()))
    save()

    # 5. the merged export, checked to act as the adapter does
    merged = root / "merged"
    if not (merged / "config.json").is_file():
        run("rvla-export", export, [str(rl), "--out", str(merged), "--overwrite"], log)
    files = sorted(p.name for p in merged.iterdir())
    results["export"] = {"files": files, "matches_adapter": merged_matches(rl, merged)}
    results["card"] = (rl / "adapter" / "README.md").is_file() and (merged / "README.md").is_file()
    save()
    return results


def merged_matches(rl: Path, merged: Path) -> bool:
    """The merged model's deterministic actions equal the adapter's on a few frames of the task's camera."""
    import torch

    from rvla_peft.config import load_config
    from rvla_peft.policies.registry import build_policy, load_policy

    gen = torch.Generator().manual_seed(0)
    obs = {"rgb": torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=gen),
           "instruction": ["push the cube to the goal region"] * 4}  # fmt: skip
    with torch.no_grad():
        adapter = load_policy(None, rl / "adapter").eval().act(obs, deterministic=True).action
        recipe = load_config(merged / "recipe.yaml", [f"model.name_or_path={merged}"])
        whole = build_policy(recipe).eval().act(obs, deterministic=True).action
    return bool(torch.allclose(adapter, whole, atol=1e-4))


def summary(results: dict[str, dict]) -> str:
    def pct(row: dict) -> str:
        lo, hi = row["ci95"]
        return f"{100 * row['success']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"

    def diff(row: dict) -> str:
        lo, hi = row["ci95"]
        return f"{100 * row['difference']:+.0f} [{100 * lo:+.0f}, {100 * hi:+.0f}]"

    p = RL_PERTURBATION
    lines = [
        "| family | parameters | warm-up steps (best) | warm-up clean % | after RL: clean % | "
        f"{p}: warm-up % | {p}: RL % | RL - warm-up, {p} | merged = adapter |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, r in results.items():
        w, e = r["warmup_eval"], r["rl_eval"]
        lines.append(
            f"| `{family}` | {r['parameters'] / 1e6:.2f} M | {r['warmup']['best']['step']} | {pct(w['base/clean'])} | "
            f"{pct(e['robust/clean'])} | {pct(e[f'base/{p}'])} | {pct(e[f'robust/{p}'])} | "
            f"{diff(e[f'robust-base/{p}'])} | {r['export']['matches_adapter']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results folder (resumes what is there)")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="default: every family")
    parser.add_argument("--smoke", action="store_true", help="builtin widths, 3 demonstrations, 2 steps: no bar")
    parser.add_argument("--max-steps", type=int, default=FULL.sft["max_steps"], help="warm-up optimizer steps")
    parser.add_argument("--clean-episodes", type=int, default=FULL.demos["clean"][0], help="expert demonstrations")
    parser.add_argument("--dart-episodes", type=int, default=FULL.demos["dart"][0], help="DART ones (noise 0.5)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = SMOKE if args.smoke else FULL
    if not args.smoke:
        demos = {"clean": (args.clean_episodes, 10_000, 0.0), "dart": (args.dart_episodes, 20_000, 0.5)}
        every = max(args.max_steps // 8, 1)  # 8 checks of closed-loop success along the warm-up
        sft = {**scale.sft, "max_steps": args.max_steps, "eval_every": every, "save_every": every}
        scale = dataclasses.replace(scale, sft=sft, demos=demos)
    log: list = []
    demos = record_demos(out, scale, log)
    results = {family: chain(family, out, demos, scale) for family in args.family or sorted(FAMILIES)}
    table = summary(results)
    (out / "summary.md").write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
