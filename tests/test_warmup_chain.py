"""bench/warmup_chain.py's small version: for every family, scripted demonstrations -> a full warm-up -> its
evaluation -> an RL update from it -> the robustness report -> the merged export, which acts as the adapter does,
and the cards; a second call resumes (every stage's output is there, no command runs again)."""

import json

import pytest
import yaml
from helpers import load_bench_script

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


def test_the_chain_runs_for_every_family_and_resumes(tmp_path):
    chain = load_bench_script("warmup_chain")
    assert chain.main(["--smoke", "--out", str(tmp_path)]) == 0
    commands = {}
    for family in chain.FAMILIES:
        results = json.loads((tmp_path / family / "results.json").read_text())
        commands[family] = [c["command"].split()[0] for c in results["commands"]]
        assert commands[family] == ["rvla-sft", "rvla-eval", "rvla-train", "rvla-eval", "rvla-export"]
        assert results["warmup"]["best"]["step"] == chain.SMOKE.sft["max_steps"]
        assert results["warmup"]["trained_parameters"] >= results["parameters"]  # full fine-tuning: every weight
        assert results["warmup_eval"]["base/clean"]["episodes"] == chain.SMOKE.eval_episodes
        paired = results["rl_eval"][f"robust-base/{chain.RL_PERTURBATION}"]
        assert -1 <= paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1] <= 1
        assert results["export"]["matches_adapter"] is True and results["card"] is True
        # RL trained a LoRA on the warmed-up model, which its adapter names as its base
        adapter_config = json.loads((tmp_path / family / "rl" / "adapter" / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(tmp_path / family / "warmup" / "model")
        # the configuration docs/warm-up.md measured (PPO + invariance), whatever algorithm the demo's recipe uses
        rl = yaml.safe_load((tmp_path / family / "rl" / "adapter" / "recipe.yaml").read_text())
        assert rl["algorithm"] == "ppo" and rl["regularizers"]["invariance"]["weight"] == 1.0
    table = (tmp_path / "summary.md").read_text()
    assert all(f"| `{family}` |" in table for family in chain.FAMILIES)

    assert chain.main(["--smoke", "--out", str(tmp_path), "--family", "pi0"]) == 0
    results = json.loads((tmp_path / "pi0" / "results.json").read_text())
    assert [c["command"].split()[0] for c in results["commands"]] == commands["pi0"]
