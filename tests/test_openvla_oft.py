"""The ``openvla_oft`` family on ``builtin:tiny-openvla``: OFT's parallel decoding, the Gaussian / Laplace action
distribution, PPO with both penalties, the adapter + heads round trip, chunks on a real env, and the LoRA defaults of
the OpenVLA families on the published 7B layout."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import fixed_obs
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_openvla import PUBLISHED_CONFIG
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForImageTextToText

from rvla_peft.algorithms.ppo import policy_loss, value_loss
from rvla_peft.config import ConfigError, load_config
from rvla_peft.policies.distributions import action_entropy, action_log_prob
from rvla_peft.policies.openvla_oft.modeling import OpenVLAOFTPolicy, StateDependentScale
from rvla_peft.policies.registry import build_policy, load_base, lora_config, resolve_lora
from rvla_peft.regularizers import grad_norm_penalty, hutchinson_jacobian_sq_norm, smoothness_penalty
from rvla_peft.trainer import RobustPPOTrainer
from rvla_peft.utils.constants import ACTION_HEADS_FILE

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CHUNK, EXECUTED, A = 4, 2, 7
INSTRUCTIONS = ["pick up the red cube", "push the cube to the goal region please", "lift"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def oft_cfg(tmp_path, *overrides):
    """The tiny recipe on the tiny OpenVLA as an OFT policy: chunks of 4, 2 executed; the family's LoRA targets."""
    return load_config(
        RECIPES / "tiny_cpu.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            "model.name_or_path=builtin:tiny-openvla",
            "policy.family=openvla_oft",
            f"policy.chunk_size={CHUNK}",
            f"policy.execute_steps={EXECUTED}",
            "lora.target_modules=null",
            "lora.adapt_output_layer=false",
            "report_to=[]",
            "total_updates=1",
            "eval_episodes=0",
            "env.num_envs=2",
            "env.max_episode_steps=8",
            "ppo.num_steps=4",
            "ppo.num_minibatches=2",
            "ppo.update_epochs=1",
            *overrides,
        ],
    )


def make_policy(tmp_path, *overrides, seed: int = 0) -> OpenVLAOFTPolicy:
    torch.manual_seed(seed)
    return build_policy(oft_cfg(tmp_path, *overrides))


@pytest.fixture
def policy(tmp_path):
    return make_policy(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# the forward pass


def test_forward_is_ofts_parallel_decoding_with_bidirectional_attention(policy, tmp_path):
    """Against OFT's own composition (unpadded): BOS, patches, prompt, zero placeholders, </s>, every position
    attending to every other one; the head reads the hidden state before each action slot."""
    obs = fixed_obs(2, instructions=["lift the cube"] * 2)
    model = policy.model
    ids, mask = policy.encode_prompts(obs["instruction"])
    assert mask.all()
    with torch.no_grad():
        features, prompt_hidden = policy._features(obs)
        embed = model.get_input_embeddings()
        n = CHUNK * A
        text = torch.cat([embed(ids), torch.zeros(2, n, 64), embed(torch.full((2, 1), 2))], dim=1)  # </s> = 2
        patches = model.get_image_features(policy.observation_inputs(obs))
        joint = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
        everything = torch.zeros(2, 1, joint.shape[1], joint.shape[1])  # additive mask: no causal triangle
        hidden = model.get_decoder()(inputs_embeds=joint, attention_mask=everything, use_cache=False).last_hidden_state
    start = patches.shape[1] + ids.shape[1] - 1  # OFT's NUM_PATCHES + NUM_PROMPT_TOKENS (prompt tokens after BOS)
    torch.testing.assert_close(features, hidden[:, start : start + n], atol=1e-5, rtol=0)
    torch.testing.assert_close(prompt_hidden, hidden[:, start], atol=1e-5, rtol=0)

    # Bidirectional: the stop token, after every action slot, changes the first action feature (the last prompt token).
    policy.stop_token_id = 3
    with torch.no_grad():
        assert not torch.allclose(policy._features(obs)[0][:, 0], features[:, 0], atol=1e-4)

    # the left-padded batch gives each row its own result
    obs = fixed_obs(3, instructions=INSTRUCTIONS)
    policy.stop_token_id = 2
    with torch.no_grad():
        batched = policy._features(obs)[0]
        for row in range(3):
            alone = policy._features({"rgb": obs["rgb"][row : row + 1], "instruction": INSTRUCTIONS[row : row + 1]})[0]
            torch.testing.assert_close(alone[0], batched[row], atol=1e-5, rtol=0)


def test_action_head_has_ofts_parameter_names_and_loads_a_released_file(policy, tmp_path):
    # prismatic/models/action_heads.py: L1RegressionActionHead.model = MLPResNet(num_blocks=2, ...)
    expected = {"model.layer_norm1", "model.fc1", "model.layer_norm2", "model.fc2"} | {
        f"model.mlp_resnet_blocks.{b}.ffn.{i}" for b in (0, 1) for i in (0, 1)
    }
    shapes = {k: tuple(v.shape) for k, v in policy.action_head.state_dict().items()}
    assert set(shapes) == {f"{m}.{p}" for m in expected for p in ("weight", "bias")}
    assert shapes["model.fc1.weight"] == (64, 64 * A) and shapes["model.fc2.weight"] == (A, 64)
    # OFT saves torch.save(action_head.state_dict()) of a DDP-wrapped head: keys start with "module."
    released = {f"module.{k}": torch.randn_like(v) for k, v in policy.action_head.state_dict().items()}
    torch.save(released, tmp_path / "action_head--150000_checkpoint.pt")
    loaded = make_policy(tmp_path, f"policy.action_head_file={tmp_path / 'action_head--150000_checkpoint.pt'}")
    for k, v in loaded.action_head.state_dict().items():
        assert torch.equal(v, released[f"module.{k}"]), k


# ---------------------------------------------------------------------------------------------------------------
# the action distribution


@pytest.mark.parametrize(
    "distribution, scale_head", [("laplace", "state_independent"), ("gaussian", "state_dependent")]
)
def test_act_samples_a_chunk_whose_log_prob_evaluate_and_torch_distributions_agree_on(
    tmp_path, distribution, scale_head
):
    policy = make_policy(tmp_path, f"policy.action_distribution={distribution}", f"policy.scale_head={scale_head}")
    assert isinstance(policy.scale_head, StateDependentScale) == (scale_head == "state_dependent")
    obs = fixed_obs(3, instructions=INSTRUCTIONS)
    torch.manual_seed(1)
    sample = policy.act(obs)
    assert sample.action.shape == (3, CHUNK, A) and sample.action.dtype == torch.float32
    assert sample.env_action.shape == (3, EXECUTED, A) and sample.mean.shape == (3, EXECUTED, A)
    assert sample.env_action.abs().max() <= 1  # identity un-normalisation of the clipped executed steps
    torch.testing.assert_close(sample.env_action, sample.action[:, :EXECUTED].clamp(-1, 1))
    assert torch.isfinite(sample.log_prob).all() and sample.log_prob.shape == sample.value.shape == (3,)

    out = policy.evaluate(obs, sample.action)
    assert out.log_prob.requires_grad and out.mean.requires_grad
    torch.testing.assert_close(out.log_prob, sample.log_prob, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mean, sample.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.value, sample.value, atol=1e-6, rtol=0)

    # independently: torch.distributions over the executed steps, around the heads' outputs
    with torch.no_grad():
        mean, log_scale = policy._heads(policy._features(obs)[0])
    assert (log_scale >= -5).all() and (log_scale <= 0.5).all()
    family = torch.distributions.Laplace if distribution == "laplace" else torch.distributions.Normal
    dist = family(mean[:, :EXECUTED], log_scale[:, :EXECUTED].exp())
    torch.testing.assert_close(sample.log_prob, dist.log_prob(sample.action[:, :EXECUTED]).sum((1, 2)))
    torch.testing.assert_close(out.entropy.detach(), dist.entropy().sum((1, 2)))
    # the pure functions, elementwise
    x = torch.randn(5, 3)
    torch.testing.assert_close(
        action_log_prob(distribution, x, x * 0.5, x * 0.1), family(x * 0.5, (x * 0.1).exp()).log_prob(x)
    )
    torch.testing.assert_close(action_entropy(distribution, x), family(x * 0, x.exp()).entropy())
    # the unexecuted steps are sampled but never scored
    changed = sample.action.clone()
    changed[:, EXECUTED:] += 10
    torch.testing.assert_close(policy.evaluate(obs, changed).log_prob, out.log_prob, atol=0, rtol=0)

    greedy = policy.act(obs, deterministic=True)
    torch.testing.assert_close(greedy.action, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(greedy.env_action, mean[:, :EXECUTED].clamp(-1, 1), atol=1e-6, rtol=0)
    at_mode = dist.log_prob(mean[:, :EXECUTED]).sum((1, 2))  # the density's maximum
    torch.testing.assert_close(greedy.log_prob, at_mode)
    assert (greedy.log_prob > sample.log_prob).all()


def test_env_actions_are_unnormalised_with_q01_q99(tmp_path):
    low, high = [-0.1] * 6 + [0.0], [0.1] * 6 + [1.0]
    policy = make_policy(tmp_path, f"policy.action_low={low}", f"policy.action_high={high}")
    sample = policy.act(fixed_obs(2))
    block = sample.action[:, :EXECUTED].clamp(-1, 1)
    expected = 0.5 * (block + 1) * (torch.tensor(high) - torch.tensor(low)) + torch.tensor(low)
    torch.testing.assert_close(sample.env_action, expected)


def test_the_gripper_is_mapped_to_maniskills_convention_after_unnormalising(tmp_path):
    """policy.gripper=zero_one (OFT checkpoints: 0 = close, 1 = open): the executed gripper is 2x - 1 of the
    un-normalised value, the arm as before; a published checkpoint gets OpenVLA's binarised map by default."""
    low, high = [-0.1] * 6 + [0.0], [0.1] * 6 + [1.0]
    bounds = (f"policy.action_low={low}", f"policy.action_high={high}")
    policy = make_policy(tmp_path, *bounds, "policy.gripper=zero_one")
    assert policy.cfg.gripper == "zero_one"
    sample = policy.act(fixed_obs(2))
    block = sample.action[:, :EXECUTED].clamp(-1, 1)
    unnormalised = 0.5 * (block + 1) * (torch.tensor(high) - torch.tensor(low)) + torch.tensor(low)
    torch.testing.assert_close(sample.env_action[..., :6], unnormalised[..., :6])
    torch.testing.assert_close(sample.env_action[..., 6], 2 * unnormalised[..., 6] - 1)
    # null: the base's convention, resolved when the recipe loads (and so written into the run's recipe.yaml)
    assert oft_cfg(tmp_path, "policy.gripper=null").policy.gripper == "signed"  # a builtin base
    assert oft_cfg(tmp_path, "policy.gripper=null", "model.name_or_path=/ckpt/openvla-oft").policy.gripper == (
        "zero_one_binary"
    )


# ---------------------------------------------------------------------------------------------------------------
# training


def test_ppo_and_jacobian_and_smoothness_move_lora_and_both_heads(tmp_path):
    policy = make_policy(tmp_path, "policy.scale_head=state_dependent")
    obs = fixed_obs(4)
    torch.manual_seed(2)
    sample = policy.act(obs)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    out = policy.evaluate(obs, sample.action)
    loss = policy_loss(out.log_prob, sample.log_prob, torch.tensor([1.0, -1.0, 0.5, -0.5]), 0.2)[0]
    loss = loss + 0.5 * value_loss(out.value, sample.value, torch.ones(4), 0.2) - 0.01 * out.entropy.mean()
    loss = loss + smoothness_penalty(out.mean, sample.mean + 0.1)
    with sdpa_kernel(SDPBackend.MATH):  # the CPU's fused SDPA kernel has no double backward
        pixels = policy.observation_inputs(obs).detach().requires_grad_(True)
        mean = policy.evaluate(obs, sample.action, pixel_values=pixels).mean
        jacobian = hutchinson_jacobian_sq_norm(mean, pixels, 1, generator=torch.Generator().manual_seed(0))
        with policy.capture_visual_embeddings() as captured:  # the paper's form: d log pi / d visual embeddings
            log_prob = policy.evaluate(obs, sample.action).log_prob
        penalty = grad_norm_penalty(log_prob, captured[0], g_max=10.0)
    assert captured[0].shape == (4, 16, 64)
    assert torch.isfinite(jacobian).all() and (jacobian > 0).all() and (penalty > 0).all()
    (loss + 0.1 * jacobian.mean() + 0.1 * penalty.mean()).backward()

    # every adapted layer gets a gradient, except the tiny towers' last blocks, which never run (the comment on
    # openvla/configuration.OPENVLA_UNUSED_MODULES); SigLIP's attention pool is not adapted at all
    lora_b = {n: p for n, p in policy.named_parameters() if "lora_B" in n}
    no_grad = {n for n, p in lora_b.items() if p.grad is None or not p.grad.abs().sum() > 0}
    assert no_grad and all(".blocks.2." in n for n in no_grad), sorted(no_grad)
    assert not any("attn_pool" in n for n in lora_b)
    optimizer.step()
    moved = {n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    for part in ("language_model", "vision_backbone", "projector"):
        assert any("lora_B" in n and part in n for n in moved), part
    for part in ("action_head.", "scale_head.trunk.", "scale_head.log_b_head.", "value_head."):
        assert any(n.startswith(part) for n in moved), part


def test_trainer_executes_chunks_on_maniskill_and_the_adapter_reloads_bit_exactly(tmp_path):
    """One real update: rollout.collect runs each 2-step chunk open-loop (8-step episodes: truncation and bootstrap
    inside the rollout), PPO + both penalties, then the adapter and heads reload bit for bit."""
    cfg = oft_cfg(tmp_path, "ppo.num_minibatches=1")  # one optimizer step
    trainer = RobustPPOTrainer(cfg)
    heads_before = {k: v.clone() for k, v in trainer.policy.action_head.state_dict().items()}
    scale_before = trainer.policy.scale_head.log_scale.detach().clone()
    metrics = trainer.train()
    for key in ("loss/ppo", "loss/value", "loss/jacobian", "loss/smooth", "ppo/approx_kl", "rollout/return"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["rollout/episodes"] == 2 and metrics["rollout/episode_length"] == 8  # 4 chunks of 2 steps
    assert metrics["time/env_steps"] == 4 * 2 * EXECUTED
    policy = trainer.policy.eval()
    assert not torch.equal(policy.scale_head.log_scale, scale_before)
    assert any(not torch.equal(v, heads_before[k]) for k, v in policy.action_head.state_dict().items())

    adapter = Path(cfg.output_dir) / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors", ACTION_HEADS_FILE} <= {
        p.name for p in adapter.iterdir()
    }
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "builtin:tiny-openvla"
    assert set(adapter_config["exclude_modules"]) >= {"attn_pool.q", "fused_featurizer.blocks.26.mlp.fc2"}
    heads = load_file(str(adapter / ACTION_HEADS_FILE))
    assert torch.equal(heads["action_head.model.fc1.weight"], policy.action_head.model.fc1.weight)
    assert torch.equal(heads["scale_head.log_scale"], policy.scale_head.log_scale)

    # the adapter alone, with PEFT alone
    obs = fixed_obs(3, instructions=INSTRUCTIONS)
    ids, mask = policy.encode_prompts(obs["instruction"])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=policy.observation_inputs(obs))
    base, _ = load_base(cfg.model)
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, policy.peft_model(**inputs).logits)

    # the whole policy: LoRA + value head + action and scale heads
    again = build_policy(cfg, adapter=adapter).eval()
    actions = policy.act(obs).action
    with torch.no_grad():
        a, b = policy.evaluate(obs, actions), again.evaluate(obs, actions)
    for field in ("log_prob", "entropy", "value", "mean"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field

    with pytest.raises(ValueError, match="policy.scale_head"):
        build_policy(oft_cfg(tmp_path, "policy.scale_head=state_dependent"), adapter=adapter)
    (adapter / ACTION_HEADS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="trained action and scale"):
        build_policy(cfg, adapter=adapter)


# ---------------------------------------------------------------------------------------------------------------
# LoRA defaults, configuration, recipe


@pytest.mark.parametrize("family", ["openvla", "openvla_oft"])
def test_lora_defaults_adapt_every_linear_layer_that_runs_in_the_7b_model(tmp_path, family):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tmp_path))
    never_run = []  # module-name prefixes: the blocks after the one OpenVLA reads its features from, SigLIP's pool
    for tower in ("featurizer", "fused_featurizer"):
        vit = getattr(model.vision_backbone, tower)
        never_run += [f"vision_backbone.{tower}.blocks.{i}." for i in range(vit.feature_layer + 1, len(vit.blocks))]
        never_run += [f"vision_backbone.{tower}.attn_pool."] if hasattr(vit, "attn_pool") else []
    # 24 DINOv2 blocks and 27 SigLIP blocks, each read after its second-to-last
    assert (
        never_run[0] == "vision_backbone.featurizer.blocks.23."
        and "vision_backbone.fused_featurizer.blocks.26." in never_run
    )
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {n for n in linear if not n.startswith(tuple(never_run))} - {"language_model.lm_head"}

    cfg = load_config(None, [f"policy.family={family}"])
    lora = resolve_lora(family, cfg.lora)
    assert (lora.r, lora.alpha, lora.target_modules) == (32, 16, "all-linear")
    with torch.device("meta"):
        peft_model = get_peft_model(model, lora_config(model, lora))
    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "lora_" not in n.rsplit(".", 1)[-1]
    }
    assert adapted == expected, (sorted(adapted - expected)[:5], sorted(expected - adapted)[:5])


def test_config_checks_and_the_recipe_validates(tmp_path):
    with pytest.raises(ConfigError, match="policy.execute_steps"):
        oft_cfg(tmp_path, "policy.execute_steps=5")
    with pytest.raises(ConfigError, match="lora.adapt_output_layer"):
        oft_cfg(tmp_path, "lora.adapt_output_layer=true")
    with pytest.raises(ConfigError, match="policy.log_scale_bounds"):
        oft_cfg(tmp_path, "policy.log_scale_bounds=[1.0, 0.0]")
    with pytest.raises(ConfigError, match="policy.action_distribution"):
        oft_cfg(tmp_path, "policy.action_distribution=cauchy")
    assert oft_cfg(tmp_path, "policy.unnorm_key=bridge_orig").policy.unnorm_key == "bridge_orig"
    cfg = load_config(RECIPES / "openvla_oft_maniskill.yaml")
    assert cfg.policy.family == "openvla_oft" and cfg.model.name_or_path.startswith("moojink/openvla-7b-oft")
    assert (cfg.policy.chunk_size, cfg.policy.action_dim, cfg.policy.execute_steps) == (8, 7, 8)
    assert cfg.policy.action_head_file == "action_head--150000_checkpoint.pt"
    assert cfg.model.attn_implementation in ("sdpa", "eager")
