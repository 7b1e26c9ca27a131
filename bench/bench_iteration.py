"""Cost of the robustness regularisers: one training iteration (rollout + PPO update) with the regularisers at the
recipe's defaults vs off, interleaved on the same trainer in one run (these machines are noisy: read the ratio).

    python bench/bench_iteration.py [RECIPE] [--iters 4] [key=value ...]

Target on tiny_cpu: iteration ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rvla_peft.config import load_config  # noqa: E402
from rvla_peft.rollout import collect  # noqa: E402
from rvla_peft.trainer import RobustPPOTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/tiny_cpu.yaml")
    parser.add_argument("--iters", type=int, default=4, help="iterations per setting (interleaved)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    out = tempfile.mkdtemp(prefix="rvla_bench.")
    cfg = load_config(args.recipe, [f"output_dir={out}", "report_to=[]", "eval_episodes=0", *args.overrides])
    jac_w, smooth_w = cfg.regularizers.jacobian.weight, cfg.regularizers.smoothness.weight
    trainer = RobustPPOTrainer(cfg)
    obs = trainer.train_env.reset(seed=cfg.seed)
    times: dict[str, dict[str, list[float]]] = {
        "on": {"rollout": [], "update": []},
        "off": {"rollout": [], "update": []},
    }
    for i in range(args.iters * 2 + 1):
        setting = "on" if i % 2 else "off"
        cfg.regularizers.jacobian.weight = jac_w if setting == "on" else 0.0
        cfg.regularizers.smoothness.weight = smooth_w if setting == "on" else 0.0
        start = time.perf_counter()
        trainer.policy.eval()
        rollout, obs = collect(trainer.policy, trainer.train_env, obs, cfg.ppo.num_steps, cfg.ppo.gamma)
        mid = time.perf_counter()
        trainer.policy.train()
        trainer.update(rollout)
        end = time.perf_counter()
        if i == 0:
            continue  # warm-up
        times[setting]["rollout"].append(mid - start)
        times[setting]["update"].append(end - mid)
    med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in times.items()}
    it = {s: med[s]["rollout"] + med[s]["update"] for s in med}
    print(
        f"recipe={args.recipe} jacobian.weight={jac_w} ({cfg.regularizers.jacobian.form}, "
        f"fraction={cfg.regularizers.jacobian.fraction}, probes={cfg.regularizers.jacobian.num_probes}) "
        f"smoothness.weight={smooth_w} ({cfg.regularizers.smoothness.form}) "
        f"batch={cfg.ppo.num_steps}x{cfg.env.num_envs} iters={args.iters}"
    )
    for s in ("off", "on"):
        print(
            f"  regularisers {s:3s}: rollout {med[s]['rollout']:.2f} s  update {med[s]['update']:.2f} s  "
            f"iteration {it[s]:.2f} s"
        )
    print(f"ratio update    (on/off): {med['on']['update'] / med['off']['update']:.2f}")
    print(f"ratio iteration (on/off): {it['on'] / it['off']:.2f}   (target <= 1.3)")


if __name__ == "__main__":
    main()
