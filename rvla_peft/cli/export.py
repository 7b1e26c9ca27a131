"""``python -m rvla_peft.export OUTPUT_DIR --out DIR``: merge a trained adapter into its base and write a standalone
checkpoint (:func:`rvla_peft.exporting.export_merged`)."""

from __future__ import annotations

import argparse
import sys

from rvla_peft.adapters import HubError
from rvla_peft.config import ConfigError
from rvla_peft.exporting import export_merged


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rvla_peft.export",
        description="Merge a trained LoRA adapter into its base: a standalone checkpoint that loads without peft.",
    )
    parser.add_argument("output_dir", help="a training run's output_dir, an adapter folder or a Hub adapter id")
    parser.add_argument("--out", required=True, help="folder to write (refused if not empty, unless --overwrite)")
    parser.add_argument("--base", help="base to merge into: Hub id or folder (default: the recipe's)")
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="merge an adapter trained on a 4-/8-bit base into the unquantized base",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--allow-base-mismatch", action="store_true", help="--base is the adapter's base under another name"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = export_merged(
            args.output_dir,
            args.out,
            base=args.base,
            dequantize=args.dequantize,
            overwrite=args.overwrite,
            allow_base_mismatch=args.allow_base_mismatch,
        )
    except (ValueError, ConfigError, HubError, OSError) as e:  # ExportError, BaseMismatchError, a bad recipe, no base
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Merged checkpoint written to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
