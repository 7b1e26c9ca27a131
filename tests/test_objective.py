"""The loss assembly (rvla_peft.objective) on its own: no trainer, no env; a hand-built rollout of random frames
through the tiny random model, every term recomputed from the policy's outputs and compared exactly."""

import pytest
import torch
from conftest import train_under_pixel_noise

from rvla_peft.algorithms import kl_k3
from rvla_peft.algorithms.ppo import compute_gae, policy_loss, value_loss
from rvla_peft.objective import compute_losses, make_batch, micro_batches, subset_size
from rvla_peft.regularizers import smoothness_penalty, token_invariance_kl
from rvla_peft.rollout import Rollout

T, N = 2, 2


def _rollout(policy, seed: int = 0) -> Rollout:
    """T steps x N envs of random frames (the clean ones different), actions sampled by the policy."""
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (T + 1, N, 64, 64, 3), dtype=torch.uint8, generator=gen)
    rgb_clean = torch.randint(0, 256, (T, N, 64, 64, 3), dtype=torch.uint8, generator=gen)
    instructions = ["push the cube to the goal"] * N
    samples = [policy.act({"rgb": rgb[t], "instruction": instructions}) for t in range(T)]
    stack = lambda key: torch.stack([getattr(s, key) for s in samples])  # noqa: E731
    return Rollout(
        rgb=rgb,
        actions=stack("action"),
        log_probs=stack("log_prob"),
        values=stack("value"),
        rewards=torch.rand(T, N, generator=gen),
        dones=torch.tensor([[False, True], [False, False]]),
        means=stack("mean"),
        next_value=torch.zeros(N),
        instructions=instructions,
        rgb_clean=rgb_clean,
    )


def _move_off_the_reference(policy) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def policy(tiny_policy):
    tiny_policy.freeze_reference()
    _move_off_the_reference(tiny_policy)
    return tiny_policy.eval()  # no dropout: the terms are compared exactly


def test_ppo_terms_are_each_recomputed_exactly_and_sum_to_the_total(policy, tiny_cfg):
    cfg = tiny_cfg
    cfg.kl_to_base, cfg.kl_to_base_frames = 0.1, "clean"
    cfg.regularizers.jacobian.weight = 0.0
    cfg.regularizers.smoothness.weight, cfg.regularizers.smoothness.form = 0.2, "old_policy"
    inv = cfg.regularizers.invariance
    inv.weight, inv.form, inv.target, inv.fraction = 0.5, "exact", "base", 1.0
    rollout = _rollout(policy)
    batch = make_batch(policy, rollout, cfg)
    idx = torch.arange(T * N)
    losses = compute_losses(policy, rollout, idx, batch, batch.advantages, cfg)

    actions = rollout.flat(rollout.actions)
    advantages, returns = compute_gae(
        rollout.rewards, rollout.values, rollout.dones, rollout.next_value, gamma=cfg.ppo.gamma, gae_lambda=0.95
    )
    with torch.no_grad():
        out = policy.evaluate(rollout.observations(idx), actions)
        on_clean = policy.evaluate(rollout.clean_observations(idx), actions)
        with policy.peft_model.disable_adapter():  # the reference: the adapter off
            ref_clean = policy.evaluate(rollout.clean_observations(idx), actions)
    pg, _ = policy_loss(out.log_prob, rollout.flat(rollout.log_probs), rollout.flat(advantages), cfg.ppo.clip_coef)
    expected = {
        "policy": pg - cfg.ppo.ent_coef * out.entropy.mean(),
        "value": cfg.ppo.vf_coef * value_loss(out.value, rollout.flat(rollout.values), rollout.flat(returns), None),
        "kl_to_base": 0.1 * kl_k3(on_clean.log_prob, ref_clean.log_prob).mean(),
        "smooth": 0.2 * smoothness_penalty(out.mean, rollout.flat(rollout.means)),
        "invariance": 0.5 * token_invariance_kl(out.logits, ref_clean.logits).mean(),
    }
    assert list(losses.terms) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses.terms[name].detach(), value, msg=name)
    assert expected["kl_to_base"] > 1e-4 and expected["invariance"] > 1e-4, "the adapter is off the reference"
    torch.testing.assert_close(losses.total, sum(losses.terms.values()))
    assert losses.stats["loss/total"] is losses.total


def test_without_a_critic_there_is_no_value_term(policy, tiny_cfg):
    tiny_cfg.algorithm = "distill"
    rollout = _rollout(policy)
    batch = make_batch(policy, rollout, tiny_cfg)
    losses = compute_losses(policy, rollout, torch.arange(4), batch, batch.advantages, tiny_cfg)
    assert "value" not in losses.terms and "loss/value" not in losses.stats


def test_distill_is_the_reference_clean_frame_distribution_against_the_policy_on_the_perturbed_frame(policy, tiny_cfg):
    cfg = tiny_cfg
    cfg.algorithm, cfg.kl_to_base = "distill", 0.0
    for reg in (cfg.regularizers.jacobian, cfg.regularizers.smoothness, cfg.regularizers.invariance):
        reg.weight = 0.0
    rollout = _rollout(policy)
    batch = make_batch(policy, rollout, cfg)
    idx = torch.arange(T * N)
    losses = compute_losses(policy, rollout, idx, batch, batch.advantages, cfg)
    assert list(losses.terms) == ["distill"], "no reward term, no critic"
    assert "loss/ppo" not in losses.stats and "ppo/approx_kl" in losses.stats
    actions = rollout.flat(rollout.actions)
    with torch.no_grad():
        student = policy.evaluate(rollout.observations(idx), actions)
        with policy.peft_model.disable_adapter():
            teacher = policy.evaluate(rollout.clean_observations(idx), actions)
    expected = token_invariance_kl(student.logits, teacher.logits).mean()
    torch.testing.assert_close(losses.terms["distill"].detach(), expected)
    assert expected > 1e-4
    losses.total.backward()
    lora = [p for n, p in policy.named_parameters() if "lora_" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora), "the student side trains"
    assert all(p.grad is None for p in policy.value_head.parameters())


def test_micro_batches_and_subsets():
    assert [m.tolist() for m in micro_batches(torch.arange(10, 15), 2)] == [[0, 1, 2], [3, 4]]
    assert [m.tolist() for m in micro_batches(torch.arange(2), 4)] == [[0], [1]]  # never an empty one
    assert (subset_size(8, 0.25), subset_size(3, 0.25), subset_size(8, 1.0)) == (2, 1, 8)


def test_distill_trains_the_lora_without_a_reward_or_the_value_head(tiny_cfg):
    tiny_cfg.algorithm = "distill"
    tiny_cfg.total_updates = 2
    for reg in (tiny_cfg.regularizers.jacobian, tiny_cfg.regularizers.smoothness):
        reg.weight = 0.0
    trainer, metrics, rollout = train_under_pixel_noise(tiny_cfg)
    assert rollout.rgb_clean is not None, "distillation keeps the clean frames"
    assert metrics["loss/distill"] > 0 and "loss/value" not in metrics
    assert metrics["ppo/optimizer_steps"] == 2
    assert all(torch.count_nonzero(p) == 0 for p in trainer.policy.value_head.net[-1].parameters()), "not trained"
    assert any(torch.count_nonzero(p) for n, p in trainer.policy.named_parameters() if "lora_B" in n)
