"""The pi0 family on a real tiny PI0 (transformers' PI0ForConditionalGeneration) loaded through from_pretrained,
with a real peft LoRA: flow-SDE log-probs, the fixed-noise mean, regularisers, a PPO step, save / reload."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import fixed_obs
from safetensors.torch import load_file
from torch.distributions import Normal
from torch.nn.attention import SDPBackend, sdpa_kernel

from rvla_peft.algorithms.ppo import policy_loss, value_loss
from rvla_peft.config import load_config
from rvla_peft.envs.maniskill import Step
from rvla_peft.policies.distributions import gaussian_entropy, gaussian_log_prob
from rvla_peft.policies.pi0.modeling import flow_sde_sigma, flow_sde_step, flow_timesteps, noisy_step
from rvla_peft.policies.registry import LORA_DEFAULTS, build_policy
from rvla_peft.regularizers import grad_norm_penalty, hutchinson_jacobian_sq_norm, smoothness_penalty
from rvla_peft.rollout import collect

EXECUTE = 3  # of the tiny model's chunk of 8


def pi0_cfg(tmp_path=None, *overrides):
    base = [
        "model.name_or_path=builtin:tiny-pi0",
        "policy.family=pi0",
        "policy.prompt_template='{instruction}'",
        f"policy.execute_steps={EXECUTE}",
        "report_to=[]",
    ]
    if tmp_path is not None:
        base.append(f"output_dir={tmp_path / 'run'}")
    return load_config(None, base + list(overrides))


def new_policy(*overrides):
    torch.manual_seed(0)
    return build_policy(pi0_cfg(None, *overrides)).eval()


@pytest.fixture(scope="module")
def policy():
    """Read-only: tests that change weights build their own. Every step noised and scored (likelihood=sum)."""
    return new_policy("policy.likelihood=sum")


def with_random_lora(policy):
    """LoRA B starts at zero (the adapter is a no-op): give it weights so that save / reload has something to keep."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy


# --------------------------------------------------------------------------------------------------------------
# the flow-SDE maths


def test_sde_step_is_euler_without_noise_and_rlinf_form_with_noise():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 8, 4, generator=g), torch.randn(2, 8, 4, generator=g)
    t, dt = 0.75, 0.25
    mean, std = flow_sde_step(x, v, t, dt, 0.0)
    assert torch.equal(mean, x - dt * v) and torch.equal(std, torch.zeros_like(x))
    # RLinf writes the same mean as weights on the predicted action x0 = x - t v and the predicted noise x1
    sigma = flow_sde_sigma(t, dt, noise_level=0.5)
    assert sigma == pytest.approx(0.5 * math.sqrt(0.75 / 0.25))
    x0, x1 = x - v * t, x + v * (1 - t)
    expected = x0 * (1 - (t - dt)) + x1 * (t - dt - sigma**2 * dt / (2 * t))
    mean, std = flow_sde_step(x, v, t, dt, sigma)
    torch.testing.assert_close(mean, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(std, torch.full_like(x, math.sqrt(dt) * sigma))
    # the first step (t = 1) stays finite: 1 - t is floored at dt
    assert flow_sde_sigma(1.0, 0.25, 0.5) == pytest.approx(0.5 * math.sqrt(1 / 0.25))
    assert flow_timesteps(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_gaussian_log_prob_and_entropy_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    x, mean, std = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g) + 0.1
    torch.testing.assert_close(gaussian_log_prob(x, mean, std.log()), Normal(mean, std).log_prob(x))
    torch.testing.assert_close(gaussian_entropy(std.log()), Normal(mean, std).entropy())


# --------------------------------------------------------------------------------------------------------------
# the policy


def _full_velocity(policy, obs, x, t):
    """v(x, t) from one full PI0 forward (prefix included, no cache reuse): independent of the policy's sampler."""
    ids, mask = policy.encode_prompts(obs["instruction"])
    n = ids.shape[0]
    out = policy.model(
        state=torch.zeros(n, policy.max_state_dim),
        noise=x,
        timestep=torch.full((n,), t),
        input_ids=ids,
        pixel_values=policy.observation_inputs(obs)[:, None],
        pixel_attention_mask=torch.ones(n, 1, dtype=torch.bool),
        attention_mask=mask,
    )
    return out.logits.float()


def test_act_log_prob_is_the_sum_of_gaussian_step_log_probs(policy):
    obs = fixed_obs(3)
    torch.manual_seed(1)
    sample = policy.act(obs)
    k_steps, a = policy.num_steps, policy.action_dim
    assert sample.action.shape == (3, k_steps + 1, policy.chunk_size, policy.max_action_dim)
    assert sample.action.dtype == torch.float32 and sample.log_prob.shape == sample.value.shape == (3,)
    chain, expected = sample.action, torch.zeros(3)
    with torch.no_grad():
        for i in range(k_steps):
            t, dt = 1 - i / k_steps, 1 / k_steps
            x, x_next = chain[:, i], chain[:, i + 1]
            v = _full_velocity(policy, obs, x, t)
            sigma = 0.5 * math.sqrt(t / max(1 - t, dt))  # policy.noise_level defaults to 0.5
            mean = x - dt * v - sigma**2 * dt / (2 * t) * (x + (1 - t) * v)
            step = Normal(mean[:, :EXECUTE, :a], math.sqrt(dt) * sigma)
            expected += step.log_prob(x_next[:, :EXECUTE, :a]).sum((1, 2))
            # outside the executed block the chain follows the plain ODE (no noise, no log-prob)
            ode = x - dt * v
            torch.testing.assert_close(x_next[:, EXECUTE:], ode[:, EXECUTE:], atol=1e-5, rtol=0)
            torch.testing.assert_close(x_next[:, :, a:], ode[:, :, a:], atol=1e-5, rtol=0)
    torch.testing.assert_close(sample.log_prob, expected, atol=1e-4, rtol=0)

    out = policy.evaluate(obs, sample.action)
    torch.testing.assert_close(out.log_prob, sample.log_prob, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.value, sample.value, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.mean, sample.mean, atol=1e-6, rtol=0)
    stds = [math.sqrt(dt) * 0.5 * math.sqrt(t / max(1 - t, dt)) for t in (1 - i * dt for i in range(k_steps))]
    entropy = sum(float(Normal(0.0, std).entropy()) for std in stds) * EXECUTE * a
    torch.testing.assert_close(out.entropy, torch.full((3,), entropy), atol=1e-4, rtol=0)


def test_one_step_noises_one_step_per_chain_and_scores_that_step_alone():
    """likelihood=one_step (RLinf's default): the chain leaves the ODE at one step, drawn from its x_0, and the
    log-prob is that step's Gaussian on the executed block; the update recomputes it from the stored chain."""
    policy = new_policy()  # the default
    assert policy.cfg.likelihood == "one_step"
    obs = fixed_obs(3)
    torch.manual_seed(2)
    sample = policy.act(obs)
    k_steps, a, chain = policy.num_steps, policy.action_dim, sample.action
    noised = noisy_step(chain[:, 0], k_steps)
    expected = torch.zeros(3)
    with torch.no_grad():
        for i in range(k_steps):
            t, dt = 1 - i / k_steps, 1 / k_steps
            x, x_next = chain[:, i], chain[:, i + 1]
            v = _full_velocity(policy, obs, x, t)
            sigma = 0.5 * math.sqrt(t / max(1 - t, dt))
            mean = x - dt * v - sigma**2 * dt / (2 * t) * (x + (1 - t) * v)
            for row in range(3):
                if i == noised[row]:
                    step = Normal(mean[row, :EXECUTE, :a], math.sqrt(dt) * sigma)
                    expected[row] = step.log_prob(x_next[row, :EXECUTE, :a]).sum()
                    assert (x_next[row] - (x - dt * v)[row]).abs().max() > 1e-3  # noised here
                else:
                    torch.testing.assert_close(x_next[row], (x - dt * v)[row], atol=1e-5, rtol=0)  # the ODE
    torch.testing.assert_close(sample.log_prob, expected, atol=1e-4, rtol=0)
    out = policy.evaluate(obs, chain)
    torch.testing.assert_close(out.log_prob, sample.log_prob, atol=1e-4, rtol=0)
    t, dt = 1 - noised.double() / k_steps, 1 / k_steps
    std = math.sqrt(dt) * 0.5 * (t / (1 - t).clamp(min=dt)).sqrt()
    entropy = torch.stack([Normal(0.0, s.item()).entropy() for s in std]) * EXECUTE * a
    torch.testing.assert_close(out.entropy, entropy.float(), atol=1e-4, rtol=0)
    # the step drawn from x_0 takes every value
    draws = noisy_step(torch.randn(400, 4, 3), k_steps)
    assert set(draws.tolist()) == set(range(k_steps))


def test_mean_is_the_sum_divided_by_k(policy):
    averaged = new_policy("policy.likelihood=mean")
    obs = fixed_obs(2)
    torch.manual_seed(3)
    summed = policy.act(obs)
    torch.manual_seed(3)
    sample = averaged.act(obs)
    assert torch.equal(sample.action, summed.action)  # every step noised in both
    torch.testing.assert_close(sample.log_prob, summed.log_prob / policy.num_steps, atol=1e-5, rtol=0)
    out, out_sum = averaged.evaluate(obs, sample.action), policy.evaluate(obs, sample.action)
    torch.testing.assert_close(out.entropy, out_sum.entropy / policy.num_steps, atol=1e-5, rtol=0)


def test_env_action_is_the_first_k_actions_of_the_chunk_in_range(policy):
    obs = fixed_obs(2)
    sample = policy.act(obs)
    assert sample.env_action.shape == (2, EXECUTE, 7)
    assert sample.env_action.abs().max() <= 1
    torch.testing.assert_close(sample.env_action, sample.action[:, -1, :EXECUTE, :7].clamp(-1, 1))
    assert sample.mean.shape == (2, EXECUTE, 7)


def test_deterministic_act_is_the_fixed_noise_ode_and_repeatable(policy):
    obs = fixed_obs(2)
    a, b = policy.act(obs, deterministic=True), policy.act(obs, deterministic=True)
    assert torch.equal(a.env_action, b.env_action) and torch.equal(a.mean, b.mean)
    assert torch.equal(a.env_action, a.mean.clamp(-1, 1))
    assert torch.equal(a.action[:, 0], torch.zeros_like(a.action[:, 0]))
    # the same ODE as transformers' own sampler from a zero noise
    ids, mask = policy.encode_prompts(obs["instruction"])
    reference = policy.model.sample_actions(
        state=torch.zeros(2, policy.max_state_dim),
        input_ids=ids,
        pixel_values=policy.observation_inputs(obs)[:, None],
        noise=torch.zeros(2, policy.chunk_size, policy.max_action_dim),
        attention_mask=mask,
        pixel_attention_mask=torch.ones(2, 1, dtype=torch.bool),
        num_steps=policy.num_steps,
    )
    torch.testing.assert_close(a.mean, reference[:, :EXECUTE, :7], atol=1e-5, rtol=0)
    # a stochastic act reports the same mean
    torch.testing.assert_close(policy.act(obs).mean, a.mean, atol=1e-5, rtol=0)


def test_mixed_instructions_are_right_padded_without_changing_results(policy):
    obs = fixed_obs(2, instructions=["pick up the cube", "push the red cube to the goal region please"])
    chain = policy.act(obs).action
    batched = policy.evaluate(obs, chain)
    for row in range(2):
        alone = policy.evaluate({k: v[row : row + 1] for k, v in obs.items()}, chain[row : row + 1])
        torch.testing.assert_close(alone.log_prob, batched.log_prob[row : row + 1], atol=1e-3, rtol=1e-6)
        torch.testing.assert_close(alone.mean, batched.mean[row : row + 1], atol=1e-5, rtol=0)


def test_state_is_zero_unless_use_state(policy, monkeypatch):
    obs = {**fixed_obs(2), "state": torch.randn(2, 9)}
    assert torch.equal(policy._state(obs, 2), torch.zeros(2, policy.max_state_dim))
    monkeypatch.setattr(policy.cfg, "use_state", True)
    state = policy._state(obs, 2)
    assert torch.equal(state[:, :9], obs["state"]) and torch.equal(state[:, 9:], torch.zeros(2, 23))
    with pytest.raises(ValueError, match="use_state"):
        policy._state(fixed_obs(2), 2)


def test_mean_is_differentiable_in_the_pixels_for_the_jacobian_penalty(policy):
    obs = fixed_obs(2)
    chain = policy.act(obs).action
    with sdpa_kernel(SDPBackend.MATH):
        pixels = policy.observation_inputs(obs).detach().requires_grad_(True)
        out = policy.evaluate(obs, chain, pixel_values=pixels)
        jac = hutchinson_jacobian_sq_norm(out.mean, pixels, num_probes=2, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(jac).all() and (jac > 0).all()
        jac.mean().backward()  # double backward into the LoRA weights
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    policy.zero_grad(set_to_none=True)

    with policy.capture_visual_embeddings() as captured:  # the paper's form: d log pi / d visual embeddings
        out = policy.evaluate(obs, chain)
    assert len(captured) == 1
    penalty = grad_norm_penalty(out.log_prob, captured[0], g_max=1e6)
    assert torch.isfinite(penalty).all() and (penalty > 0).all()


def test_one_ppo_and_regulariser_step_changes_the_lora_weights():
    policy = new_policy()
    obs = fixed_obs(4)
    torch.manual_seed(2)
    sample = policy.act(obs)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    policy.train()
    out = policy.evaluate(obs, sample.action)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    pg, stats = policy_loss(out.log_prob, sample.log_prob, advantages, clip_coef=0.2)
    assert stats["approx_kl"].abs() < 1e-4  # same weights: ratio 1
    loss = pg + 0.5 * value_loss(out.value, sample.value, advantages, None)
    with sdpa_kernel(SDPBackend.MATH):
        pixels = policy.observation_inputs({"rgb": obs["rgb"][:2]}).detach().requires_grad_(True)
        jac_out = policy.evaluate({"instruction": obs["instruction"][:2]}, sample.action[:2], pixel_values=pixels)
        loss = loss + 0.01 * hutchinson_jacobian_sq_norm(jac_out.mean, pixels).mean()
    loss = loss + 0.1 * smoothness_penalty(out.mean, sample.mean)
    loss.backward()
    optimizer.step()
    changed = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed) and any("value_head" in n for n in changed)
    after = policy.evaluate(obs, sample.action)
    assert not torch.allclose(after.log_prob, out.log_prob)


class _FakeChunkEnv:
    """A 2-env stand-in for the ManiSkill VecEnv: records the actions it is given, reward = -||action||."""

    num_envs, device, instructions = 2, torch.device("cpu"), ["pick up the cube", "pick up the cube"]

    def __init__(self):
        self.actions = []

    def _obs(self):
        return {"rgb": fixed_obs(2, seed=len(self.actions))["rgb"], "state": torch.zeros(2, 9)}

    def reset(self, seed=None, rebuild=False):
        return self._obs()

    def step(self, action):
        self.actions.append(action)
        no = torch.zeros(2, dtype=torch.bool)
        return Step(
            self._obs(), -action.norm(dim=1), no, no, None, no, torch.zeros(2), torch.zeros(2, dtype=torch.long)
        )


def test_rollout_executes_each_chunk_open_loop_and_stores_the_chain(policy):
    env = _FakeChunkEnv()
    rollout, _ = collect(policy, env, env.reset(), num_steps=2, gamma=0.99)
    assert len(env.actions) == 2 * EXECUTE and all(a.shape == (2, 7) for a in env.actions)
    assert rollout.actions.shape == (2, 2, policy.num_steps + 1, policy.chunk_size, policy.max_action_dim)
    assert rollout.means.shape == (2, 2, EXECUTE, 7) and rollout.env_steps == 2 * 2 * EXECUTE
    # what the trainer does: flat rows, observations rebuilt from the buffer, log-probs recomputed
    idx = torch.tensor([0, 3])
    flat = rollout.actions.reshape(-1, *rollout.actions.shape[2:])
    out = policy.evaluate(rollout.observations(idx), flat[idx])
    torch.testing.assert_close(out.log_prob, rollout.log_probs.reshape(-1)[idx], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# adapters


def test_adapter_reloads_bit_exactly_into_a_fresh_base(tmp_path):
    policy = with_random_lora(new_policy())
    obs = fixed_obs(2)
    torch.manual_seed(3)
    chain = policy.act(obs).action
    policy.save_pretrained(tmp_path / "adapter", base_model_id="lerobot/pi0_base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "lerobot/pi0_base"
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and not any("embed_action_time" in k for k in saved)
    assert any("action_out_proj" in k for k in saved) and any("dit" in k for k in saved)
    assert (tmp_path / "adapter" / "value_head.safetensors").exists()

    reloaded = build_policy(pi0_cfg(), adapter=tmp_path / "adapter").eval()  # load_adapter_strict inside
    with torch.no_grad():
        a, b = policy.evaluate(obs, chain), reloaded.evaluate(obs, chain)
    assert torch.equal(a.log_prob, b.log_prob) and torch.equal(a.mean, b.mean) and torch.equal(a.value, b.value)


def test_lora_on_embed_action_time_does_not_round_trip_so_the_default_excludes_it(tmp_path):
    excluded = {"action_in_proj", "state_proj", "action_time_mlp_in", "action_time_mlp_out"}
    assert set(LORA_DEFAULTS["pi0"]["exclude_modules"]) == excluded
    policy = with_random_lora(new_policy("lora.exclude_modules=[]"))
    policy.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="embed_action_time"):
        build_policy(pi0_cfg(None, "lora.exclude_modules=[]"), adapter=tmp_path / "adapter")


def test_recipe_validates():
    from rvla_peft.cli.train import main

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "pi0_maniskill.yaml"
    cfg = load_config(recipe)
    assert cfg.policy.family == "pi0" and cfg.model.torch_dtype == "bfloat16"
    assert main([str(recipe), "--dry-run"]) == 0
