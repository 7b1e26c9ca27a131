"""``rvla-pretrain`` / ``python -m rvla_peft.pretrain``: behaviour cloning of a small action-token VLA on scripted-
expert demonstrations (:mod:`rvla_peft.pretrain`)."""

from __future__ import annotations

import argparse
import sys

from rvla_peft.pretrain import PretrainError, pretrain
from rvla_peft.utils.commands import portable_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Behaviour cloning of a small action-token VLA on scripted-expert demos (rvla_peft.demos)."
    )
    p.add_argument("--demos", action="append", required=True, help="demo folder (repeatable)")
    p.add_argument("--out", required=True, help="output folder: the best checkpoint (save_pretrained) + card")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--name", default=None, help="model name in the card (default: the --out folder's name)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--label-sigma", type=float, default=0.0, help="Gaussian label spread in bins (0: plain CE)")
    p.add_argument("--shift", type=int, default=0, help="augmentation: random shift up to this many pixels")
    p.add_argument("--jitter", type=float, default=0.0, help="augmentation: brightness/contrast factor spread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of each task's episodes held out")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    # model
    p.add_argument("--init", default=None, help="start from this checkpoint (folder, Hub id, builtin:NAME)")
    p.add_argument("--hidden-size", type=int, default=128, help="language model width (multiple of 64)")
    p.add_argument("--num-layers", type=int, default=4, help="language model layers")
    p.add_argument("--vision-hidden-size", type=int, default=128, help="vision tower width (multiple of 64)")
    p.add_argument("--vision-layers", type=int, default=2, help="vision tower layers")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64, help="model input size (the demos' size is best)")
    p.add_argument(
        "--tokenizer", choices=["words", "chars"], default="words",
        help="text tokenizer of a fresh model: 'words' (BPE learnt on the built-in instructions; short prompts) or "
        "'chars' (the tiny Llava's per-character one)",
    )  # fmt: skip
    # policy
    p.add_argument("--n-bins", type=int, default=256, help="action bins on the last n_bins vocabulary ids")
    p.add_argument("--action-low", type=float, nargs="+", default=None, help="per-dimension q01 (default identity)")
    p.add_argument("--action-high", type=float, nargs="+", default=None, help="per-dimension q99 (default identity)")
    # closed loop
    p.add_argument("--eval-every", type=int, default=2, help="closed-loop success every N epochs (0: never)")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes per task (0: no closed loop)")
    p.add_argument("--eval-seed", type=int, default=5000, help="reset seeds eval_seed + e (away from the demos')")
    p.add_argument("--eval-task", dest="eval_tasks", action="append", help="task (repeatable; default: the demos')")
    p.add_argument("--eval-num-envs", type=int, default=2)
    p.add_argument("--max-episode-steps", type=int, default=50)
    # provenance for the card
    p.add_argument(
        "--demos-command", action="append", help="a command that recorded the demos (repeatable; for the card)"
    )
    p.add_argument("--machine-note", default="a 2-core CPU machine (no GPU)", help="where it ran (for the card)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "n_bins", "patch_size", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = portable_command("python -m rvla_peft.pretrain", sys.argv[1:] if argv is None else argv)
    try:
        pretrain(args, command)
    except PretrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
