"""The supervised warm-up (rvla_peft.sft): each family's loss against a hand computation and against a second route
to the same number, training that lowers the loss, bit-exact resume, the bad-input errors, and RL that continues from
a warm-up adapter with the warm-up as its reference policy. Fast: synthetic demonstrations, the tiny models."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rvla_peft.adapters import WarmupAdapterError
from rvla_peft.cli.sft import main as sft_cli
from rvla_peft.config import ConfigError
from rvla_peft.demos import FORMAT, INDEX, Episode, _write_shard
from rvla_peft.policies.action_tokens.modeling import token_cross_entropy
from rvla_peft.policies.base import REFERENCE_ADAPTER, Policy
from rvla_peft.policies.common import normalize_actions
from rvla_peft.policies.openvla_oft.modeling import l1_regression_loss
from rvla_peft.policies.pi0.modeling import flow_matching_inputs, flow_matching_loss, sample_flow_time
from rvla_peft.policies.registry import build_policy, load_policy
from rvla_peft.sft import (
    CHECKPOINT_DIR,
    MODEL_DIR,
    TRAINABLE_FILE,
    SFTConfig,
    action_chunks,
    load_sft_config,
    sample_stream,
    sft,
)
from rvla_peft.utils.constants import ADAPTER_DIR, ADAPTER_WEIGHTS, RECIPE_FILE, SFT_RECORD_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RECIPES = Path(__file__).resolve().parent.parent / "recipes"

FAMILIES = {
    "action_tokens": ["model.name_or_path=builtin:tiny-llava"],
    "openvla": [
        "model.name_or_path=builtin:tiny-openvla",
        "policy.family=openvla",
        "lora.target_modules=null",
    ],
    "openvla_oft": [
        "model.name_or_path=builtin:tiny-openvla",
        "policy.family=openvla_oft",
        "policy.chunk_size=4",
        "lora.target_modules=null",
    ],
    "pi0": ["model.name_or_path=builtin:tiny-pi0", "policy.family=pi0", "policy.prompt_template='{instruction}'"],
}


def write_demos(
    root: Path, episodes: int = 4, steps: int = 5, size: int = 32, seed: int = 0, dim: int = 7, constant: bool = False
) -> Path:
    """A PushCube demonstrations folder in rvla_peft.demos' format: random images and random actions, or with
    ``constant`` one fixed action (something a few steps can learn)."""
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.linspace(-0.6, 0.6, dim)
    root.mkdir(parents=True)
    eps = [
        Episode(
            100 + e,
            True,
            {
                "rgb": torch.randint(0, 256, (steps, size, size, 3), dtype=torch.uint8, generator=gen),
                "state": torch.zeros(steps, 16),
                "action": fixed.expand(steps, dim).clone()
                if constant
                else torch.rand(steps, dim, generator=gen) * 2 - 1,
                "reward": torch.zeros(steps),
            },
        )
        for e in range(episodes)
    ]
    _write_shard(root / "PushCube-v1-00000.safetensors", eps)
    index = {"format": FORMAT, "seed": 100, "image_size": size, "camera": "base_camera",
             "control_mode": "pd_ee_delta_pose", "action_dim": dim,
             "tasks": {"PushCube-v1": {"instruction": "push the cube to the goal region", "episodes": episodes,
                                       "dropped": 0, "steps": episodes * steps, "seeds": [e.seed for e in eps],
                                       "shards": ["PushCube-v1-00000.safetensors"]}}}  # fmt: skip
    (root / INDEX).write_text(json.dumps(index))
    return root


def sft_config(tmp_path, family: str, *overrides, demos: Path | None = None) -> SFTConfig:
    demos = demos or write_demos(tmp_path / "demos")
    base = [f"demos=[{demos}]", f"output_dir={tmp_path / 'out'}", "env.image_size=32", "batch_size=4",
            "val_fraction=0.25", "eval_every=0", "learning_rate=3e-3"]  # fmt: skip
    return load_sft_config(None, [*FAMILIES[family], *base, *overrides])


def batch(n: int = 2, size: int = 32, horizon: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    obs = {
        "rgb": torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen),
        "instruction": ["push the cube to the goal region"] * n,
    }
    actions = torch.rand(n, horizon, 7, generator=gen) * 2 - 1
    mask = torch.ones(n, horizon, dtype=torch.bool)
    mask[-1, horizon // 2 :] = False
    return obs, actions, mask


# ---------------------------------------------------------------------------------------------------------------
# the losses by hand


def test_token_cross_entropy_by_hand():
    """softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]: slot 2 costs ln 2, slot 0 ln 4; the mean over slots."""
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)]]], dtype=torch.float64)
    loss = token_cross_entropy(logits, torch.tensor([[2, 0]]))
    assert loss.item() == pytest.approx(1.5 * math.log(2), abs=1e-12)


def test_l1_regression_loss_by_hand():
    predicted = torch.tensor([[[0.5, -0.5], [1.0, 0.0]], [[0.25, 0.0], [3.0, 3.0]]])
    target = torch.zeros(2, 2, 2)
    mask = torch.tensor([[True, True], [True, False]])  # the last step is past its episode's end
    assert l1_regression_loss(predicted, target, mask).item() == (0.5 + 0.5 + 1.0 + 0.0 + 0.25 + 0.0) / 6
    assert l1_regression_loss(predicted, target).item() == (0.5 + 0.5 + 1.0 + 0.25 + 6.0) / 8


def test_flow_matching_by_hand():
    """x_t = t * noise + (1 - t) * a and u = noise - a: integrating the sampler's step x <- x - dt * u from t to 0
    lands on the action exactly (the sign this family's sampler uses)."""
    actions = torch.tensor([[[0.5, -1.0, 0.0]]])
    noise = torch.tensor([[[-1.0, 1.0, 2.0]]])
    x_t, u = flow_matching_inputs(actions, noise, torch.tensor([0.25]))
    assert torch.equal(x_t, torch.tensor([[[0.125, -0.5, 0.5]]]))
    assert torch.equal(u, torch.tensor([[[-1.5, 2.0, 2.0]]]))
    assert torch.equal(x_t - 0.25 * u, actions)
    velocity = torch.tensor([[[-1.0, 2.0, 9.0], [5.0, 5.0, 5.0]]])  # column 2 is padding, step 1 past the end
    target = torch.tensor([[[-1.5, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    loss = flow_matching_loss(velocity, target, torch.tensor([[True, False]]), action_dim=2)
    assert loss.item() == (0.5**2 + 1.0**2) / 2


def test_flow_time_is_openpis_beta():
    """t = Beta(1.5, 1) * 0.999 + 0.001: its mean 0.6 * 0.999 + 0.001, within [0.001, 1]; a generator decides it."""
    t = sample_flow_time(200_000, torch.Generator().manual_seed(0))
    assert t.min() >= 0.001 and t.max() <= 1.0
    assert t.double().mean().item() == pytest.approx(0.6 * 0.999 + 0.001, abs=3e-3)
    assert t.double().var().item() == pytest.approx(1.5 / (2.5**2 * 3.5) * 0.999**2, rel=0.03)
    assert torch.equal(
        sample_flow_time(5, torch.Generator().manual_seed(1)), sample_flow_time(5, torch.Generator().manual_seed(1))
    )
    other = sample_flow_time(100_000, torch.Generator().manual_seed(0), alpha=2.0, beta=3.0, scale=1.0, offset=0.0)
    assert other.double().mean().item() == pytest.approx(0.4, abs=3e-3)


def test_action_chunks_stop_at_the_episode_end():
    action = torch.arange(5.0)[:, None]  # episodes of 3 and 2 steps
    step_episode = torch.tensor([0, 0, 0, 1, 1])
    chunks, mask = action_chunks(action, step_episode, torch.tensor([0, 2, 3]), 3)
    assert chunks.squeeze(-1).tolist() == [[0, 1, 2], [2, 2, 2], [3, 4, 4]]
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]


def test_sample_stream_is_epochs_of_permutations_and_pure():
    train = torch.tensor([10, 11, 12])
    stream = sample_stream(train, 0, 9, seed=0)
    for epoch in range(3):
        assert sorted(stream[3 * epoch : 3 * epoch + 3].tolist()) == [10, 11, 12]
    assert torch.equal(sample_stream(train, 2, 5, seed=0), stream[2:7])
    assert not torch.equal(sample_stream(train, 0, 9, seed=1), stream)


# ---------------------------------------------------------------------------------------------------------------
# each family's loss against a second route to the same number


def policy_of(family: str, *overrides):
    torch.manual_seed(0)
    cfg = load_sft_config(None, [*FAMILIES[family], "demos=[unused]", *overrides]).train_config()
    return build_policy(cfg).eval()


@pytest.mark.parametrize("family", ["action_tokens", "openvla"])
def test_token_loss_is_the_mean_negative_log_prob_of_the_expert_tokens(family):
    policy = policy_of(family)
    obs, actions, mask = batch()
    slots = policy.action_tokenizer.env_to_slots(actions[:, 0])
    with torch.no_grad():
        loss = policy.supervised_loss(obs, actions, mask)
        log_prob = policy.evaluate(obs, slots).log_prob  # summed over the action dimensions
    assert loss.item() == pytest.approx(-(log_prob / 7).mean().item(), abs=1e-5)
    # the expert's slots decode to within half a bin of its actions (the targets are the right tokens)
    decoded = policy.action_tokenizer.unnormalize(policy.action_tokenizer.slot_to_normalized(slots))
    assert (decoded - actions[:, 0]).abs().max() <= 1 / (policy.cfg.n_bins - 1) + 1e-6  # half of 2 / (n_bins - 1)


def test_oft_loss_is_l1_to_the_deterministic_chunk():
    policy = policy_of("openvla_oft", "policy.action_low=[-2,-2,-2,-2,-2,-2,-2]", "policy.action_high=[2,2,2,2,2,2,2]")
    obs, actions, mask = batch(horizon=6)
    with torch.no_grad():
        loss = policy.supervised_loss(obs, actions, mask)
        chunk = policy.act(obs, deterministic=True).action  # the action head's output, [B, chunk=4, A]
    target = (actions[:, :4] / 2).clamp(-1, 1)  # normalised with low/high = -2/2
    expected = ((chunk - target).abs() * mask[:, :4, None]).sum() / (mask[:, :4].sum() * 7)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_pi0_loss_is_the_models_own_flow_matching_loss():
    """The same noise and time through transformers' PI0 training forward (its ``actions`` argument, MSE between
    noise - actions and the predicted velocity): the per-element losses agree, masked and sliced as LeRobot does."""
    policy = policy_of("pi0")
    obs, actions, mask = batch(horizon=policy.chunk_size)
    with torch.no_grad():
        loss = policy.supervised_loss(obs, actions, mask, torch.Generator().manual_seed(3))
        gen = torch.Generator().manual_seed(3)
        target = torch.zeros(2, policy.chunk_size, policy.max_action_dim)
        target[..., :7] = normalize_actions(actions, None, None)
        noise = torch.randn(target.shape, generator=gen)
        t = sample_flow_time(2, gen)
        ids, attention = policy.encode_prompts(obs["instruction"])
        out = policy.model(
            state=torch.zeros(2, policy.max_state_dim),
            noise=noise,
            timestep=t,
            input_ids=ids,
            pixel_values=policy.observation_inputs(obs)[:, None],
            pixel_attention_mask=torch.ones(2, 1, dtype=torch.bool),
            attention_mask=attention,
            actions=target,
        )
        per_element = torch.nn.functional.mse_loss(noise - target, out.logits, reduction="none")
    expected = (per_element[..., :7] * mask[..., None]).sum() / (mask.sum() * 7)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_every_family_has_a_supervised_objective():
    from rvla_peft.policies.families import FAMILIES as CATALOGUE
    from rvla_peft.policies.registry import policy_class

    assert all(policy_class(name).has_supervised_objective() for name in CATALOGUE)
    assert not Policy.has_supervised_objective()


# ---------------------------------------------------------------------------------------------------------------
# training


def fixed_loss(policy, demos_cfg: SFTConfig) -> float:
    from rvla_peft.sft import batch_inputs, check_demos

    data = check_demos(demos_cfg)
    idx = torch.arange(len(data))
    obs, actions, mask = batch_inputs(data, idx, policy.action_horizon)
    with torch.no_grad():
        return policy.eval().supervised_loss(obs, actions, mask, torch.Generator().manual_seed(0)).item()


@pytest.mark.parametrize("family", ["action_tokens", "openvla_oft", "pi0"])
def test_sft_lowers_the_loss_and_writes_an_adapter_rl_can_load(tmp_path, family):
    demos = write_demos(tmp_path / "demos", constant=True)
    cfg = sft_config(tmp_path, family, "max_steps=12", "val_fraction=0", "learning_rate=1e-2", demos=demos)
    torch.manual_seed(0)
    before = fixed_loss(build_policy(cfg.train_config()), cfg)
    record = sft(cfg, "rvla-sft test")
    adapter = tmp_path / "out" / ADAPTER_DIR
    assert {ADAPTER_WEIGHTS, RECIPE_FILE, SFT_RECORD_FILE, "README.md"} <= {p.name for p in adapter.iterdir()}
    assert record["best"]["step"] == 12 and (tmp_path / "out" / SFT_RECORD_FILE).is_file()
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and f"({family})" in card
    assert {"action_tokens": "cross-entropy", "openvla_oft": "L1 regression", "pi0": "flow matching"}[family] in card
    warm = load_policy(None, adapter)  # the recipe beside it; PeftModel.from_pretrained underneath
    after = fixed_loss(warm, cfg)
    # deterministic (seeded); flow matching keeps the irreducible variance of its noise, so it falls least
    assert after < 0.95 * before, (before, after)


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    """pi0 (the loss draws noise and time) with random crops: a run stopped after its step-2 checkpoint and resumed
    ends with the weights of the run that was never stopped."""
    import rvla_peft.sft as sft_module

    demos = write_demos(tmp_path / "demos")
    run = ["max_steps=4", "save_every=2", "random_crop=2", "eval_every=2"]
    sft(sft_config(tmp_path / "a", "pi0", *run, demos=demos))

    save = sft_module.save_checkpoint

    def save_then_crash(directory, params, optimizer, state):
        save(directory, params, optimizer, state)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(sft_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        sft(sft_config(tmp_path / "b", "pi0", *run, demos=demos))
    monkeypatch.setattr(sft_module, "save_checkpoint", save)
    record = sft(sft_config(tmp_path / "b", "pi0", *run, "resume_from_checkpoint=latest", demos=demos))
    a = load_file(tmp_path / "a" / "out" / CHECKPOINT_DIR / TRAINABLE_FILE)
    b = load_file(tmp_path / "b" / "out" / CHECKPOINT_DIR / TRAINABLE_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["step"] for h in record["history"]] == [2, 4]
    straight = json.loads((tmp_path / "a" / "out" / SFT_RECORD_FILE).read_text())
    assert [h["val_loss"] for h in record["history"]] == [h["val_loss"] for h in straight["history"]]


def test_full_finetune_writes_a_model_that_rl_starts_from(tmp_path):
    """OFT fully fine-tuned: output_dir/model loads with from_pretrained with the trained weights, and its recipe
    builds a policy whose base and action heads are the trained ones."""
    from transformers import AutoModelForImageTextToText

    cfg = sft_config(tmp_path, "openvla_oft", "max_steps=2", "full_finetune=true")
    sft(cfg)
    folder = tmp_path / "out" / MODEL_DIR
    assert not (tmp_path / "out" / ADAPTER_DIR).exists()
    trained = load_file(tmp_path / "out" / CHECKPOINT_DIR / TRAINABLE_FILE)
    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    state = model.state_dict()
    for name, value in trained.items():
        if name.startswith("peft_model."):
            key = name.removeprefix("peft_model.base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(state[key], value), name
    from rvla_peft.config import load_config

    policy = build_policy(load_config(folder / RECIPE_FILE))
    assert torch.equal(policy.action_head.model.fc1.weight, trained["action_head.model.fc1.weight"])


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, before any model loads


@pytest.fixture
def no_model(monkeypatch):
    import rvla_peft.policies.registry as registry

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(registry, "load_base", refuse)


def run_cli(capsys, *argv) -> str:
    assert sft_cli(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_inputs_fail_in_one_line_before_a_model_loads(tmp_path, capsys, no_model):
    demos = write_demos(tmp_path / "demos")
    common = [f"output_dir={tmp_path / 'out'}", "env.image_size=32"]
    (tmp_path / "empty").mkdir()
    assert "is not a demo dataset" in run_cli(capsys, f"demos=[{tmp_path / 'empty'}]", *common)
    assert "no demonstrations" in run_cli(capsys, *common)
    six = write_demos(tmp_path / "six", dim=6)
    assert "6 dimensions" in run_cli(capsys, f"demos=[{six}]", *common)
    assert "env.image_size=32" in run_cli(capsys, f"demos=[{demos}]", f"output_dir={tmp_path / 'out'}")
    assert "camera" in run_cli(capsys, f"demos=[{demos}]", *common, "env.camera=hand_camera")
    assert "use_state" in run_cli(capsys, f"demos=[{demos}]", *common, *FAMILIES["pi0"], "policy.use_state=true")
    quantized = [f"demos=[{demos}]", *common, "model.quantization=4bit", "full_finetune=true"]
    assert "quantized" in run_cli(capsys, *quantized)
    assert "unknown key" in run_cli(capsys, f"demos=[{demos}]", *common, "max_step=3")
    assert sft_cli([f"demos=[{demos}]", *common, "--dry-run"]) == 0


def test_a_family_without_objective_is_refused(monkeypatch):
    from rvla_peft.policies.action_tokens.modeling import ActionTokenPolicy

    monkeypatch.setattr(ActionTokenPolicy, "supervised_loss", Policy.supervised_loss)
    with pytest.raises(ConfigError, match="no supervised objective"):
        load_sft_config(None, ["demos=[x]"])


def test_a_used_output_dir_is_refused(tmp_path, capsys, no_model):
    cfg = sft_config(tmp_path, "action_tokens")
    (Path(cfg.output_dir) / ADAPTER_DIR).mkdir(parents=True)
    demos = cfg.demos[0]
    assert "already holds a warm-up" in run_cli(
        capsys, f"demos=[{demos}]", f"output_dir={cfg.output_dir}", "env.image_size=32"
    )


# ---------------------------------------------------------------------------------------------------------------
# RL from a warm-up adapter


def warm_up(tmp_path, rl_cfg) -> Path:
    """A few warm-up steps of the RL recipe's policy (same base, family, LoRA and image size)."""
    demos = write_demos(tmp_path / "demos", size=rl_cfg.env.image_size)
    cfg = SFTConfig(demos=[str(demos)], output_dir=str(tmp_path / "warm"), max_steps=3, batch_size=4,
                    eval_every=0, learning_rate=1e-2, val_fraction=0.0, model=rl_cfg.model, policy=rl_cfg.policy,
                    lora=rl_cfg.lora, env=rl_cfg.env)  # fmt: skip
    cfg.validate()
    sft(cfg)
    return tmp_path / "warm" / ADAPTER_DIR


def log_probs(policy, obs, action) -> torch.Tensor:
    with torch.no_grad():
        return policy.evaluate(obs, action).log_prob


def test_rl_continues_from_the_warm_up_with_it_as_reference(tmp_path, tiny_cfg):
    from peft.utils import get_peft_model_state_dict

    from rvla_peft.trainer import RobustPPOTrainer

    adapter = warm_up(tmp_path, tiny_cfg)
    tiny_cfg.model.adapter = str(adapter)
    tiny_cfg.kl_to_base = 0.5
    trainer = RobustPPOTrainer(tiny_cfg)
    policy = trainer.policy
    # update 0: the trainable LoRA is the warm-up's; the "reference" copy is frozen and not optimised
    saved = load_file(adapter / ADAPTER_WEIGHTS)
    trainable = get_peft_model_state_dict(policy.peft_model, adapter_name="default", save_embedding_layers=False)
    assert saved.keys() == trainable.keys() and all(torch.equal(saved[k], trainable[k].cpu()) for k in saved)
    reference = [p for n, p in policy.named_parameters() if f".{REFERENCE_ADAPTER}." in n]
    assert reference and not any(p.requires_grad for p in reference)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in reference}

    obs, _, _ = batch(n=3, size=tiny_cfg.env.image_size)
    action = policy.act(obs).action
    warm = load_policy(None, adapter).eval()
    with policy.reference():
        at_start = log_probs(policy, obs, action)
    assert torch.equal(at_start, log_probs(warm, obs, action))  # the warm-up policy, bit for bit
    with policy.peft_model.disable_adapter():
        assert not torch.equal(at_start, log_probs(policy, obs, action))  # not the raw base
    assert torch.equal(log_probs(policy, obs, action), at_start)  # update 0: policy = reference

    trainer.train()  # one RL update
    with policy.reference():
        assert torch.equal(log_probs(policy, obs, action), at_start)  # the reference did not move
    after = log_probs(policy, obs, action)
    assert not torch.equal(after, at_start)

    # the RL adapter holds the trained LoRA only, and reloads alone bit for bit
    rl_adapter = Path(tiny_cfg.output_dir) / ADAPTER_DIR
    assert not (rl_adapter / REFERENCE_ADAPTER).exists()
    assert not any(REFERENCE_ADAPTER in k for k in load_file(rl_adapter / ADAPTER_WEIGHTS))
    reloaded = load_policy(None, rl_adapter).eval()
    assert not reloaded.has_reference_adapter
    assert torch.equal(log_probs(reloaded, obs, action), after)


def test_a_warm_up_of_another_base_or_family_is_refused(tmp_path, tiny_cfg, no_model):
    from rvla_peft.config import dump_yaml, load_config

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "builtin:tiny-openvla"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(folder / ADAPTER_WEIGHTS))
    tiny_cfg.model.adapter = str(folder)
    with pytest.raises(WarmupAdapterError, match="trained on base 'builtin:tiny-openvla'"):
        build_policy(tiny_cfg)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "builtin:tiny-llava"}))
    pi0 = load_config(None, FAMILIES["pi0"])
    (folder / RECIPE_FILE).write_text(dump_yaml(pi0))
    with pytest.raises(WarmupAdapterError, match="is a 'pi0' adapter"):
        build_policy(tiny_cfg)


def test_oft_rl_from_a_warm_up_trains_its_heads_and_keeps_them_as_reference(tmp_path):
    """OpenVLA-OFT: the warm-up's action heads are the trainable heads at the start and the reference's heads for
    good; a change to the LoRA and the heads (an RL step) leaves the reference acting as the warm-up policy."""
    cfg = sft_config(tmp_path, "openvla_oft", "max_steps=3", "val_fraction=0")
    sft(cfg)
    adapter = tmp_path / "out" / ADAPTER_DIR
    warm = load_policy(None, adapter).eval()
    rl_cfg = cfg.train_config()
    rl_cfg.model.adapter = str(adapter)
    policy = build_policy(rl_cfg).eval()
    policy.freeze_reference()
    assert torch.equal(policy.action_head.model.fc1.weight, warm.action_head.model.fc1.weight)
    assert policy.action_head.model.fc1.weight.requires_grad
    obs, _, _ = batch()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad and ("lora_" in name or name.startswith("action_head.")):
                p.add_(0.01)  # what an RL step does to the trained weights
        moved = policy.act(obs, deterministic=True).action
        with policy.reference():
            reference = policy.act(obs, deterministic=True).action
        expected = warm.act(obs, deterministic=True).action
    assert torch.equal(reference, expected) and not torch.equal(moved, expected)


def test_closed_loop_success_is_measured_and_the_best_state_kept(tmp_path):
    """With eval_episodes, each evaluation runs the policy in ManiSkill on every task of the demos; the record keeps
    the success per task and the best state is the one saved."""
    cfg = sft_config(
        tmp_path, "action_tokens", "max_steps=4", "eval_every=2", "eval_episodes=1", "env.max_episode_steps=3",
        "env.num_envs=1",
    )  # fmt: skip
    record = sft(cfg)
    assert [h["step"] for h in record["history"]] == [2, 4]
    assert all(set(h["success"]) == {"PushCube-v1"} and "val_loss" in h for h in record["history"])
    saved = json.loads((tmp_path / "out" / ADAPTER_DIR / SFT_RECORD_FILE).read_text())
    assert saved["best"] == record["best"]


# ---------------------------------------------------------------------------------------------------------------
# the commands, end to end (processes)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.integration
@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("sft_*.yaml")))
def test_every_warm_up_recipe_passes_dry_run(recipe, tmp_path):
    cfg = load_sft_config(RECIPES / recipe, ["demos=[unused]"])
    demos = write_demos(tmp_path / "demos", size=cfg.env.image_size)
    done = run("-m", "rvla_peft.sft", str(RECIPES / recipe), f"demos=[{demos}]", "--dry-run", cwd=tmp_path)
    assert done.stdout.startswith("ok: ") and "Loading weights" not in done.stderr


@pytest.fixture(scope="module")
def pushcube_demos(tmp_path_factory, asset_dir) -> Path:
    """Two real scripted PushCube episodes (rvla-demos), 32 px."""
    root = tmp_path_factory.mktemp("chain")
    run("-m", "rvla_peft.demos", "--task", "PushCube-v1", "--episodes", "2", "--seed", "10000", "--out", "demos",
        "--image-size", "32", "--num-envs", "2", cwd=root)  # fmt: skip
    return root / "demos"


CHAIN = {  # each family's small architecture: the token head and the OFT head of tiny-openvla, tiny-pi0
    "openvla": FAMILIES["openvla"],
    "openvla_oft": FAMILIES["openvla_oft"],
    "pi0": FAMILIES["pi0"],
}


@pytest.mark.integration
@pytest.mark.parametrize("family", sorted(CHAIN))
def test_demos_warm_up_then_rl_from_the_adapter(family, pushcube_demos, tmp_path):
    """The chain with the commands: recorded PushCube demonstrations -> `python -m rvla_peft.sft` (a few steps) ->
    `python -m rvla_peft.train model.adapter=...` (one update). No success bar: the small version of the chain."""
    run("-m", "rvla_peft.sft", *CHAIN[family], f"demos=[{pushcube_demos}]", "output_dir=warm", "env.image_size=32",
        "max_steps=2", "batch_size=4", "eval_every=0", "val_fraction=0", cwd=tmp_path)  # fmt: skip
    adapter = tmp_path / "warm" / ADAPTER_DIR
    assert (adapter / ADAPTER_WEIGHTS).is_file() and (adapter / "README.md").is_file()
    run("-m", "rvla_peft.train", *CHAIN[family], f"model.adapter={adapter}", "output_dir=rl", "total_updates=1",
        "eval_episodes=0", "report_to=[]", "env.task=PushCube-v1", "env.image_size=32", "env.num_envs=2",
        "env.max_episode_steps=8", "ppo.num_steps=4", "ppo.num_minibatches=2", "ppo.update_epochs=1",
        "kl_to_base=0.1", cwd=tmp_path)  # fmt: skip
    rl = tmp_path / "rl" / ADAPTER_DIR
    assert not any(REFERENCE_ADAPTER in k for k in load_file(rl / ADAPTER_WEIGHTS))
    assert yaml.safe_load((tmp_path / "rl" / RECIPE_FILE).read_text())["model"]["adapter"] == str(adapter)
    metrics = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and math.isfinite(metrics[-1]["policy/kl_to_base"])


GPU_CHAINS = {  # RL recipe -> the warm-up recipe it starts from
    "openvla_maniskill.yaml": "sft_openvla_maniskill.yaml",
    "openvla_qlora_maniskill.yaml": "sft_openvla_maniskill.yaml",
    "openvla_oft_maniskill.yaml": "sft_openvla_oft_maniskill.yaml",
    "pi0_maniskill.yaml": "sft_pi0_maniskill.yaml",
    "tiny_cpu.yaml": "sft_tiny_cpu.yaml",
}


@pytest.mark.parametrize(("rl", "warm"), sorted(GPU_CHAINS.items()))
def test_rl_recipes_start_from_a_warm_up_that_fits_on_a_visible_goal(rl, warm):
    """Each GPU RL recipe runs a task whose goal the camera sees (not PickCube) and starts from the adapter of a
    warm-up recipe of the same base, policy and LoRA (tiny_cpu.yaml's warm-up is optional: it starts from the
    shipped base)."""
    from dataclasses import replace

    from rvla_peft.config import load_config

    rl_cfg = load_config(RECIPES / rl)
    warm_cfg = load_sft_config(RECIPES / warm)
    assert rl_cfg.env.task in {"PushCube-v1", "PullCube-v1", "StackCube-v1"}
    assert warm_cfg.env.task == rl_cfg.env.task and warm_cfg.env.image_size == rl_cfg.env.image_size
    if rl != "tiny_cpu.yaml":
        assert rl_cfg.model.adapter == f"{warm_cfg.output_dir}/{ADAPTER_DIR}"
    model = replace(rl_cfg.model, adapter=None, quantization="none")  # QLoRA: the bf16 warm-up on the 4-bit base
    assert replace(warm_cfg.model, quantization="none") == model
    assert warm_cfg.policy == rl_cfg.policy and warm_cfg.lora == rl_cfg.lora


def test_a_non_finite_step_is_skipped_and_too_many_stop_the_run(tmp_path, monkeypatch):
    """One NaN loss: that step is skipped (no optimizer step) and training goes on; NaN every step: the run stops with
    NonFiniteError after max_consecutive_skips, and nothing was saved."""
    from rvla_peft.policies.action_tokens.modeling import ActionTokenPolicy
    from rvla_peft.utils.errors import NonFiniteError

    real = ActionTokenPolicy.supervised_loss
    calls = []

    def nan_first(self, *args, **kwargs):
        calls.append(1)
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(ActionTokenPolicy, "supervised_loss", nan_first)
    record = sft(sft_config(tmp_path / "once", "action_tokens", "max_steps=3", "val_fraction=0"))
    assert record["skipped_steps"] == 1 and math.isfinite(record["history"][-1]["train_loss"])

    monkeypatch.setattr(ActionTokenPolicy, "supervised_loss", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    cfg = sft_config(tmp_path / "always", "action_tokens", "max_steps=5", "max_consecutive_skips=2")
    with pytest.raises(NonFiniteError, match="2 warm-up steps in a row"):
        sft(cfg)
    assert not (Path(cfg.output_dir) / ADAPTER_DIR).exists() and not (Path(cfg.output_dir) / CHECKPOINT_DIR).exists()
