"""The wheel carries what an installed package needs: a card renders from a wheel install, not from the repo, and
every console script and ``python -m`` command runs from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent

RENDER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import rvla_peft
    from rvla_peft.config import TrainConfig, dump_yaml
    from rvla_peft.cli import hub as cli
    from safetensors.torch import save_file
    import torch

    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    adapter = run / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "r": 8}))
    save_file({"w": torch.zeros(2)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "recipe.yaml").write_text(dump_yaml(TrainConfig(output_dir=str(run))))
    code = cli.main(["card", str(run), "--out", str(out), "--repo-id", "alice/robust"])
    print(json.dumps({"code": code, "package": rvla_peft.__file__}))
    """
)


@pytest.mark.integration
def test_a_wheel_install_renders_a_card_and_runs_every_command(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("rvla_peft-*.whl")
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert not (target / "cards").exists()

    script = tmp_path / "render.py"
    script.write_text(RENDER)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "card"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["code"] == 0
    assert Path(printed["package"]).is_relative_to(target), "the card must come from the wheel, not the checkout"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "base_model: org/base" in card
    assert "alice/robust" in card

    # every console script pyproject declares, and the python -m forms that cards and docs name
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"rvla-train", "rvla-eval", "rvla-export", "rvla-hub", "rvla-demos", "rvla-pretrain", "rvla-sft"} <= set(
        scripts
    )
    commands = [[str(target / "bin" / name)] for name in scripts]
    modules = ["train", "eval", "export", "hub", "demos", "pretrain", "sft", "experts", "cards"]
    commands += [[sys.executable, "-m", f"rvla_peft.{m}"] for m in modules]
    for command in commands:
        done = subprocess.run([*command, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "usage:" in done.stdout, f"{command}: {done.stderr[-2000:]}"
