"""``python -m rvla_peft.hub push|card OUTPUT_DIR ...``: the command line of :mod:`rvla_peft.hub`."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from rvla_peft.adapters import HubError
from rvla_peft.hub.card import stage
from rvla_peft.hub.push import push_adapter
from rvla_peft.hub.run_files import RunFiles
from rvla_peft.utils.io import atomic_save

logger = logging.getLogger("rvla_peft.hub")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rvla_peft.hub",
        description="Share a robust adapter on the Hugging Face Hub: model card and one-commit push.",
    )
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
