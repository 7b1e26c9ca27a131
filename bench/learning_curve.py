"""Learning curve: train ``recipes/tiny_learn.yaml`` from a fixed seed (or read a finished run) and plot the
episode return per update to a PNG.

    python bench/learning_curve.py                       # train, then plot bench/results/learning_curve.png
    python bench/learning_curve.py --metrics outputs/tiny_learn/metrics.jsonl   # plot a finished run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "rollout/return" in r]
    updates = [r["update"] for r in rows]
    returns = [r["rollout/return"] for r in rows]
    window = 5
    smooth = [
        sum(returns[max(0, i - window + 1) : i + 1]) / len(returns[max(0, i - window + 1) : i + 1])
        for i in range(len(returns))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(updates, returns, "o", ms=3, alpha=0.5, label="rollout/return (per update)")
    ax.plot(updates, smooth, "-", lw=2, label=f"mean of last {window}")
    ax.set_xlabel("PPO update")
    ax.set_ylabel("episode return (normalized dense)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, help="metrics.jsonl of a finished run (skip training)")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny_learn.yaml"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "learning_curve.png")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    metrics = args.metrics
    if metrics is None:
        from rvla_peft.config import load_config
        from rvla_peft.trainer import RobustPPOTrainer

        cfg = load_config(args.recipe, ["overwrite_output_dir=true", *args.overrides])
        RobustPPOTrainer(cfg).train()
        metrics = Path(cfg.output_dir) / "metrics.jsonl"
    plot(read_metrics(metrics), args.out, f"{Path(args.recipe).name}: tiny VLA + LoRA, PickCube-v1, seed 0")


if __name__ == "__main__":
    main()
