"""``python -m rvla_peft.cards``: render the model cards of the shipped bases and adapters (:mod:`rvla_peft.cards`)."""

from __future__ import annotations

import argparse
import sys

from rvla_peft.cards import write_shipped_cards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rvla_peft.cards",
        description="Render the model cards of the bases and adapters shipped in rvla_peft/assets from their files.",
    )
    parser.add_argument("--out", default="cards", help="folder for the browsable copies, NAME.md (default: cards)")
    parser.add_argument("--no-assets", action="store_true", help="leave rvla_peft/assets/NAME/README.md as they are")
    args = parser.parse_args(argv)
    for path in write_shipped_cards(args.out, assets=not args.no_assets):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
