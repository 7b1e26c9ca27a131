"""Model cards: the shipped cards are what the renderer makes of the shipped files (in the package and in the
repository's cards/), and no shipped record names a folder of the machine that made it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rvla_peft.cards import CARDS_LINK_PREFIX, shipped_cards
from rvla_peft.cli.cards import main
from rvla_peft.models.tiny import ASSETS_DIR, PACKAGED, PACKAGED_ADAPTERS
from rvla_peft.utils.commands import portable_argument, portable_command, portable_command_line, portable_path
from rvla_peft.utils.constants import CARD_FILE

ROOT = Path(__file__).resolve().parent.parent
CARDS = ROOT / "cards"
REGENERATE = "python -m rvla_peft.cards --out cards"
# An absolute path of a build machine: a temporary or work folder, a home, or this checkout itself.
BUILD_PATH = re.compile(
    rf"(?<![\w.~-])/(tmp|work|home|root|Users|private|var/folders|scratch|mnt)/|{re.escape(str(ROOT))}"
)


def test_shipped_cards_are_current(tmp_path):
    """Each shipped card (the README.md beside the checkpoint, and its copy in cards/) is byte for byte what the
    renderer makes from the shipped files now; cards/ holds one per shipped base and adapter, nothing else."""
    names = [*PACKAGED, *PACKAGED_ADAPTERS]
    for name, text in shipped_cards().items():
        shipped = (ASSETS_DIR / name / CARD_FILE).read_text()
        assert shipped == text, f"rvla_peft/assets/{name}/{CARD_FILE} is out of date: run `{REGENERATE}`"
    assert main(["--out", str(tmp_path), "--no-assets"]) == 0  # the regenerating command itself
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.md" for n in names)
    assert sorted(p.name for p in CARDS.iterdir()) == sorted([*(f"{n}.md" for n in names), "README.md"])
    for name in names:
        committed = (CARDS / f"{name}.md").read_text()
        rendered = (tmp_path / f"{name}.md").read_text()
        assert committed == rendered, f"cards/{name}.md is out of date: run `{REGENERATE}`"
        # a copy's links reach the files beside the shipped card, which exist
        for link in re.findall(r"\]\(([^)#]+)\)|href=\"([^\"]+)\"", committed):
            target = next(part for part in link if part)
            if not target.startswith("http"):
                assert (CARDS / target).resolve().is_file(), f"cards/{name}.md links to {target}, which is missing"
    adapter = (CARDS / f"{PACKAGED_ADAPTERS[0]}.md").read_text()
    assert CARDS_LINK_PREFIX.format(name=PACKAGED_ADAPTERS[0]) + "report.json" in adapter
    assert "](report.json)" in (ASSETS_DIR / PACKAGED_ADAPTERS[0] / CARD_FILE).read_text()


def test_no_shipped_file_names_a_build_machine_folder():
    """Commands in shipped cards, reports and pretrain.json name folders as portable_path does."""
    files = [p for folder in (ASSETS_DIR, CARDS) for p in sorted(folder.rglob("*")) if p.is_file()]
    assert len(files) > 20
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # weights and images
            continue
        found = BUILD_PATH.search(text)
        where = path.relative_to(ROOT)
        assert found is None, f"{where} names the absolute path {text[found.start() : found.end() + 30]!r}"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("outputs/run", "outputs/run"),  # relative: as typed
        ("/home/u/repo/outputs/run", "outputs/run"),  # beneath the working directory: relative to it
        ("/home/u/repo/outputs/run/", "outputs/run"),
        ("/home/u/repo", "."),  # the working directory itself
        ("/tmp/rvla_x/demos", "demos"),  # elsewhere: the folder's name
        ("/home/u/repo2/run", "run"),  # a sibling that only shares a prefix is not beneath it
        ("/home/u/repo/../other/run", "run"),
    ],
)
def test_portable_path(given, expected):
    assert portable_path(given, cwd="/home/u/repo") == expected


def test_portable_command_rewrites_every_form_of_path_argument():
    argv = ["--adapter", "shift=/tmp/a/adapter", "--out=/home/u/repo/rep ort", "output_dir=/tmp/x/run", "--seed", "3",
            "--recipe", "recipes/tiny.yaml", "--base", "org/name", "builtin:tiny"]  # fmt: skip
    command = portable_command("python -m rvla_peft.eval", argv, cwd="/home/u/repo")
    assert command == (
        "python -m rvla_peft.eval --adapter shift=adapter '--out=rep ort' output_dir=run --seed 3 "
        "--recipe recipes/tiny.yaml --base org/name builtin:tiny"
    )
    assert portable_command("python -m rvla_peft.eval", [], cwd="/") == "python -m rvla_peft.eval"
    assert portable_argument("a=b=/tmp/c", cwd="/home") == "a=b=/tmp/c"  # the value is 'b=/tmp/c': not a path
    line = "python -m rvla_peft.demos --task PushCube-v1 --out /tmp/bc_demos --note 'two words'"
    assert portable_command_line(line, cwd="/home") == (
        "python -m rvla_peft.demos --task PushCube-v1 --out bc_demos --note 'two words'"
    )


@pytest.mark.integration
def test_the_renderer_does_not_import_the_trainer():
    code = "import json, sys, rvla_peft.cards; print(json.dumps([m for m in sys.modules if m.startswith('rvla_')]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    loaded = json.loads(out)
    assert "rvla_peft.cards" in loaded
    assert not {"rvla_peft.trainer", "rvla_peft.hub.push", "rvla_peft.exporting", "rvla_peft.pretrain"} & set(loaded)
