"""Penalty weights that carry a chosen share of the gradient: train a recipe for a few updates with the gradient
norm of every loss term logged at each update (``grad_share_every=1``), then print, per penalty, its measured share
at the recipe's weight and the weight that puts it at ``--share`` of the summed gradient norms.

    python bench/calibrate_penalties.py recipes/tiny_cpu.yaml --updates 4 --share 0.2 [key=value ...]

A penalty at weight 0 is measured at weight 1. The norms are taken on the first epoch's last minibatch of each
update (the old-policy smoothness is 0 before the update's first optimizer step) and averaged over the updates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rvla_peft.algorithms.grad_share import calibrated_weights, grad_shares  # noqa: E402
from rvla_peft.config import load_config  # noqa: E402

PENALTIES = {"jacobian": "regularizers.jacobian.weight", "smooth": "regularizers.smoothness.weight"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--share", type=float, default=0.2, help="target share of each penalty (default 0.2)")
    args = parser.parse_args()

    from rvla_peft.trainer import RobustPPOTrainer

    with tempfile.TemporaryDirectory(prefix="rvla_calibrate_") as tmp:
        fixed = [f"output_dir={tmp}", f"total_updates={args.updates}", "grad_share_every=1", "eval_episodes=0",
                 "save_every=0", "report_to=[]"]  # fmt: skip
        cfg = load_config(args.recipe, [*args.overrides, *fixed])
        weights = {}
        for name in PENALTIES:
            section = cfg.regularizers.jacobian if name == "jacobian" else cfg.regularizers.smoothness
            section.weight = section.weight or 1.0
            weights[name] = section.weight
        RobustPPOTrainer(cfg).train()
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    norms: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("grad/norm_"):
                norms.setdefault(key.removeprefix("grad/norm_"), []).append(value)
    mean = {k: statistics.fmean(v) for k, v in norms.items()}
    shares = grad_shares(mean)
    others = {k: v for k, v in mean.items() if k not in PENALTIES}
    per_unit = {k: mean[k] / weights[k] for k in PENALTIES if k in mean}
    target = calibrated_weights(others, per_unit, args.share)
    print(f"recipe {args.recipe} {' '.join(args.overrides)}; {len(rows)} updates; norms averaged over updates")
    print(f"{'term':<12} {'grad norm':>10} {'share':>7}   {'weight':>9} -> weight for {args.share:.0%}")
    for name, value in mean.items():
        line = f"{name:<12} {value:>10.4g} {shares[name]:>7.1%}"
        if name in PENALTIES:
            line += f"   {weights[name]:>9.3g} -> {PENALTIES[name]}={target[name]:.3g}"
        print(line)


if __name__ == "__main__":
    main()
