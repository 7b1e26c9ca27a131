"""Behaviour cloning (rvla_peft.pretrain) and the shipped pretrained base. Fast: synthetic demos, the tiny model."""

import json
from pathlib import Path

import pytest
import torch

from rvla_peft import pretrain
from rvla_peft.cli.pretrain import main as pretrain_cli
from rvla_peft.config import load_config
from rvla_peft.demos import FORMAT, INDEX, Episode, _write_shard
from rvla_peft.models.tiny import PACKAGED_ADAPTERS, resolve_builtin
from rvla_peft.policies.action_tokens.configuration import ActionTokenPolicyConfig
from rvla_peft.policies.action_tokens.tokenizer import ActionTokenizer
from rvla_peft.utils.constants import CARD_FILE, POLICY_SETTINGS_FILE, PRETRAIN_RECORD_FILE

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
INSTRUCTIONS = {"PushCube-v1": "push the cube to the goal region", "PullCube-v1": "pull the cube to the goal region"}


def write_demos(root: Path, episodes: int = 2, steps: int = 3, size: int = 32, seed: int = 0) -> Path:
    """A demo folder in rvla_peft.demos' format: random images and actions, ``episodes`` per task of two tasks."""
    gen = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True)
    index = {"format": FORMAT, "seed": 100, "image_size": size, "camera": "base_camera",
             "control_mode": "pd_ee_delta_pose", "tasks": {}}  # fmt: skip
    for task, instruction in INSTRUCTIONS.items():
        eps = [
            Episode(
                100 + e,
                True,
                {
                    "rgb": torch.randint(0, 256, (steps, size, size, 3), dtype=torch.uint8, generator=gen),
                    "state": torch.zeros(steps, 16),
                    "action": torch.rand(steps, 7, generator=gen) * 2 - 1,
                    "reward": torch.zeros(steps),
                },
            )
            for e in range(episodes)
        ]
        _write_shard(root / f"{task}-00000.safetensors", eps)
        index["tasks"][task] = {"instruction": instruction, "episodes": episodes, "dropped": 0,
                                "steps": episodes * steps, "seeds": [e.seed for e in eps],
                                "shards": [f"{task}-00000.safetensors"]}  # fmt: skip
    (root / INDEX).write_text(json.dumps(index))
    return root


def test_action_slots_round_trip():
    """Expert action -> the policy's slot -> the env action ``act`` would execute: within half a bin, both with
    identity statistics and with q01/q99 un-normalisation."""
    actions = torch.rand(500, 7) * 2 - 1
    actions[:7, :] = torch.tensor([-1.0, 1.0, 0.0, 0.999, -0.999, 0.5, -0.5])[:, None]
    for n_bins, low, high in [(256, None, None), (64, None, None), (32, [-2.0] * 7, [2.0] * 7)]:
        tok = ActionTokenizer(512, n_bins, low, high)
        width = (tok.high - tok.low) / (n_bins - 1)
        scaled = actions * (tok.high - tok.low) / 2 + (tok.high + tok.low) / 2
        slots = pretrain.action_slots(tok, scaled)
        assert slots.min() >= 0 and slots.max() < n_bins
        back = tok.unnormalize(tok.slot_to_normalized(slots))
        assert (back - scaled).abs().max() <= width.max() / 2 + 1e-5


def test_augment_keeps_shape_and_content():
    gen = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    assert torch.equal(pretrain.augment(rgb, gen), rgb)
    out = pretrain.augment(rgb, gen, shift=2, jitter=0.1)
    assert out.shape == rgb.shape and out.dtype == torch.uint8
    shifted = pretrain.augment(rgb, gen, shift=2)
    # every shifted image is a crop of the edge-padded original: its centre 12x12 block appears in it
    for i in range(4):
        windows = torch.nn.functional.pad(rgb[i].permute(2, 0, 1).float(), (2, 2, 2, 2), mode="replicate")
        found = any(
            torch.equal(windows[:, dy : dy + 16, dx : dx + 16].permute(1, 2, 0).to(torch.uint8), shifted[i])
            for dy in range(5)
            for dx in range(5)
        )
        assert found


def test_bc_overfits_recorded_episodes(tmp_path, one_torch_thread):
    """BC on 2 tasks x 2 episodes x 3 steps: the CE falls, and the policy's argmax tokens equal the demo's, teacher
    forced and when ``act`` decodes greedily on its own (the path RL and evaluation take)."""
    policy_cfg = ActionTokenPolicyConfig(n_bins=32)
    policy = pretrain.make_policy(resolve_builtin("builtin:tiny-llava"), policy_cfg)
    data = pretrain.build_dataset([write_demos(tmp_path / "demos")], policy.action_tokenizer)
    assert len(data) == 12 and data.num_episodes == 4 and data.tasks == list(INSTRUCTIONS)
    idx = torch.arange(len(data))
    obs, slots = pretrain.observations(data, idx), data.slots
    assert (
        obs["instruction"][0] == INSTRUCTIONS["PushCube-v1"] and obs["instruction"][-1] == INSTRUCTIONS["PullCube-v1"]
    )
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(policy.peft_model.parameters(), lr=3e-3)
    policy.train()
    first = None
    for _ in range(80):
        loss, _ = pretrain.bc_loss(policy, obs, slots)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = pretrain.validate(policy, data, idx, batch_size=12)
    assert metrics["loss"] < 0.1 * first, (first, metrics)
    assert metrics["token_acc"] == 1.0 and metrics["exact"] == 1.0
    sample = policy.eval().act(obs, deterministic=True)
    assert torch.equal(sample.action, slots)
    expected = policy.action_tokenizer.unnormalize(policy.action_tokenizer.slot_to_normalized(slots))
    assert torch.allclose(sample.env_action, expected)
    assert (sample.env_action - data.action).abs().max() <= 1 / 31 + 1e-5  # half a bin of 32


def test_split_holds_out_whole_episodes(tmp_path):
    tok = ActionTokenizer(512, 32)
    data = pretrain.build_dataset([write_demos(tmp_path / "demos", episodes=5)], tok)
    train, val = pretrain.split_episodes(data, 0.2, seed=0)
    assert len(train) + len(val) == len(data)
    train_eps, val_eps = set(data.step_episode[train].tolist()), set(data.step_episode[val].tolist())
    assert not train_eps & val_eps and len(val_eps) == 2  # one of 5 per task
    assert {data.episode_task[e].item() for e in val_eps} == {0, 1}


def test_cli_writes_a_from_pretrained_checkpoint(tmp_path, capsys, one_torch_thread):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from rvla_peft.policies.registry import build_policy

    demos = write_demos(tmp_path / "demos", episodes=3, size=64)
    out = tmp_path / "base"
    args = ["--demos", str(demos), "--out", str(out), "--epochs", "2", "--batch-size", "8", "--seed", "1",
            "--hidden-size", "64", "--num-layers", "1", "--vision-hidden-size", "64", "--vision-layers", "1",
            "--n-bins", "32", "--eval-episodes", "0", "--val-fraction", "0.34", "--shift", "2"]  # fmt: skip
    assert pretrain_cli(args) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json"} <= names
    assert {POLICY_SETTINGS_FILE, PRETRAIN_RECORD_FILE, CARD_FILE} <= names
    assert not list(tmp_path.glob(".base.*")), "the staging folder must be gone"
    record = json.loads((out / PRETRAIN_RECORD_FILE).read_text())
    assert [h["epoch"] for h in record["history"]] == [1, 2] and record["wall_time_s"] > 0
    assert record["dataset"]["train_steps"] == 12 and record["dataset"]["val_steps"] == 6
    assert "python -m rvla_peft.pretrain --demos" in (out / CARD_FILE).read_text()
    # the record and card ship with the checkpoint: folders named as given, not by this machine's absolute paths
    assert record["command"].startswith("python -m rvla_peft.pretrain --demos demos --out base --epochs 2 ")
    assert record["out"] == record["args"]["out"] == "base" and record["dataset"]["demos"] == ["demos"]
    assert str(tmp_path) not in (out / PRETRAIN_RECORD_FILE).read_text() + (out / CARD_FILE).read_text()
    settings = json.loads((out / POLICY_SETTINGS_FILE).read_text())
    assert settings["n_bins"] == 32 and settings["image_size"] == 64

    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.text_config.num_hidden_layers == 1
    assert AutoProcessor.from_pretrained(out).tokenizer("ab")["input_ids"]
    cfg = load_config(RECIPES / "tiny_cpu.yaml", [f"model.name_or_path={out}", "policy.n_bins=32",
                                                  "policy.action_low=null", "policy.action_high=null"])  # fmt: skip
    policy = build_policy(cfg).eval()
    obs = {"rgb": torch.zeros(2, 64, 64, 3, dtype=torch.uint8), "instruction": list(INSTRUCTIONS.values())}
    assert policy.act(obs, deterministic=True).env_action.shape == (2, 7)

    # a finished checkpoint is not overwritten without --overwrite
    assert pretrain_cli(args) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert pretrain_cli(["--demos", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "not_demos").mkdir()
    assert pretrain_cli(["--demos", str(tmp_path / "not_demos"), "--out", out, "--hidden-size", "64"]) == 2
    assert "not a demo dataset" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / INDEX).write_text(json.dumps({"format": FORMAT, "seed": 0, "tasks": {}}))
    with pytest.raises(pretrain.PretrainError, match="empty dataset"):
        pretrain.read_demos([empty])
    assert not Path(out).exists()


def test_shipped_checkpoint_loads_and_matches_the_recipe():
    """builtin:tiny-vla-maniskill is the packaged folder, it loads through from_pretrained, its card and policy
    settings are there, recipes/tiny_cpu.yaml uses it with those settings, and it stays a few MB."""
    from rvla_peft.policies.registry import build_policy

    folder = Path(resolve_builtin("builtin:tiny-vla-maniskill"))
    assert folder.is_dir() and folder.parent.name == "assets"
    card = (folder / "README.md").read_text()
    assert "python -m rvla_peft.pretrain" in card and "python -m rvla_peft.demos" in card
    assert sum(p.stat().st_size for p in folder.iterdir()) < 10e6
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    settings = json.loads((folder / POLICY_SETTINGS_FILE).read_text())
    cfg = load_config(RECIPES / "tiny_cpu.yaml")
    assert cfg.model.name_or_path == "builtin:tiny-vla-maniskill"
    assert (cfg.policy.n_bins, cfg.policy.action_low, cfg.policy.action_high) == (
        settings["n_bins"], settings["action_low"], settings["action_high"])  # fmt: skip
    assert cfg.env.image_size == settings["image_size"] and cfg.env.camera == settings["camera"]
    policy = build_policy(cfg).eval()
    obs = {
        "rgb": torch.zeros(2, 64, 64, 3, dtype=torch.uint8),
        "instruction": ["push the cube to the goal region"] * 2,
    }
    sample = policy.act(obs, deterministic=True)
    assert sample.env_action.shape == (2, 7) and sample.env_action.abs().max() <= 1


@pytest.mark.parametrize("name", PACKAGED_ADAPTERS)
def test_shipped_adapter_loads_on_the_shipped_base(name, tmp_path):
    """Each builtin adapter (tiny-vla-maniskill-color) is a PEFT adapter folder in the package, with its
    card, recipe and the held-out report its card quotes; it loads through load_policy (base from its recipe) and
    through plain PeftModel.from_pretrained on the shipped base, where it changes the actions; unknown names list
    the shipped."""
    from peft import PeftModel

    from rvla_peft.adapters import resolve_adapter
    from rvla_peft.policies.registry import load_base, load_policy

    folder = resolve_adapter(f"builtin:{name}")
    assert folder.parent.name == "assets"
    assert {"README.md", "recipe.yaml", "report.json", "adapter_config.json"} <= {p.name for p in folder.iterdir()}
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2e6
    card = (folder / "README.md").read_text()  # the card template's wording for a packaged (not random) base
    assert "behaviour-cloned" in card and "tiny random model" not in card
    from rvla_peft.cli.hub import main as hub_cli  # the template today says so too

    assert hub_cli(["card", str(folder), "--out", str(tmp_path / "card"), "--repo-id", f"builtin:{name}"]) == 0
    card = (tmp_path / "card" / "README.md").read_text()
    assert "behaviour-cloned" in card and "tiny random model" not in card
    # the snippets of a packaged adapter's card load it from the package, as its shipped card does
    for snippet in (f'resolve_builtin_adapter("builtin:{name}")', f"rvla_peft/assets/{name}/recipe.yaml"):
        assert snippet in card and snippet in (folder / "README.md").read_text()
    policy = load_policy(None, f"builtin:{name}").eval()
    cfg = load_config(folder / "recipe.yaml")
    base, _ = load_base(cfg.model)
    peft_model = PeftModel.from_pretrained(base, str(folder))
    lora = {k: v for k, v in peft_model.state_dict().items() if "lora_B" in k}
    assert lora and all(torch.equal(v, policy.peft_model.state_dict()[k]) for k, v in lora.items())
    assert any(v.abs().max() > 0 for v in lora.values())  # trained: LoRA's B starts at zero
    with pytest.raises(ValueError, match="available: builtin:tiny-vla-maniskill-color$"):
        resolve_adapter("builtin:tiny-vla-maniskill-rotation")
    with pytest.raises(ValueError, match="tiny-vla-maniskill-shift: no longer shipped: .* not above the base"):
        resolve_adapter("builtin:tiny-vla-maniskill-shift")


def test_bc_policy_loads_without_hub_kernels():
    # behaviour cloning loads its model itself, not through load_base: the same default applies (tests/test_policy.py)
    policy = pretrain.make_policy(resolve_builtin("builtin:tiny-vla-maniskill"), ActionTokenPolicyConfig(n_bins=64))
    policy.train()
    assert policy.peft_model.use_kernels is False and policy.peft_model.kernels_mode is None


def test_other_policy_settings_than_trained_warn(caplog):
    """A recipe that decodes the shipped base with other bins gets wrong actions without any error: warn."""
    from rvla_peft.policies.registry import check_trained_policy_settings

    with caplog.at_level("WARNING", logger="rvla_peft.policies.registry"):
        check_trained_policy_settings("builtin:tiny-vla-maniskill", ActionTokenPolicyConfig(n_bins=64))
        assert not caplog.records
        check_trained_policy_settings("builtin:tiny-vla-maniskill", ActionTokenPolicyConfig())  # 256 bins
    assert "policy.n_bins=256 but builtin:tiny-vla-maniskill was trained with 64" in caplog.text
    assert "set policy.n_bins=64" in caplog.text


def test_shipped_base_pushes_the_cube_and_breaks_under_rotation(one_torch_thread):
    """The point of the shipped base: the real ManiSkill PushCube-v1, its recipe's settings, argmax actions. In the
    100-episode evaluation (bench/results/base_eval) episodes 0-7 all succeed clean and all fail under rotation@0.5;
    margins of one episode each way absorb float differences across CPUs."""
    from rvla_peft.envs import make_envs
    from rvla_peft.evaluation import evaluate_grid
    from rvla_peft.perturbations import suite_grid
    from rvla_peft.policies.registry import build_policy

    cfg = load_config(RECIPES / "tiny_cpu.yaml")
    policy = build_policy(cfg).eval()
    with make_envs(cfg.env) as env:
        grid = suite_grid(None, ["rotation@0.5:step"])  # the angle redrawn every step, as in that evaluation
        clean, rotated = evaluate_grid({"base": policy}, env, grid, episodes=8, seed=0, max_steps=50)
    assert sum(clean.successes) >= 7, clean
    assert sum(rotated.successes) <= 1, rotated
