"""Group rollouts, the trust region to the base and the drift diagnostics, on real ManiSkill envs and a real tiny VLA
(and, for dynamic sampling, a tiny scripted env whose outcomes are known)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import train_under_pixel_noise

from rvla_peft.algorithms import kl_k3, rloo_advantages
from rvla_peft.config import ConfigError, load_config
from rvla_peft.envs import PerturbedEnv, make_envs
from rvla_peft.envs.maniskill import VecEnv
from rvla_peft.metrics import make_probe, probe_drift
from rvla_peft.objective import compute_losses, make_batch
from rvla_peft.policies.base import ActionSample
from rvla_peft.rollout import collect, collect_groups
from rvla_peft.trainer import RobustPPOTrainer

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


class ResetRecorder:
    """Passes every call to a real VecEnv and keeps the seed and observation of every reset."""

    def __init__(self, env):
        self.env, self.resets = env, []
        self.num_envs, self.device, self.instructions = env.num_envs, env.device, env.instructions
        self.action_dim = env.action_dim

    def reset(self, seed=None, rebuild=False):
        obs = self.env.reset(seed=seed, rebuild=rebuild)
        self.resets.append((seed, {k: v.clone() for k, v in obs.items()}))
        return obs

    def step(self, action):
        return self.env.step(action)

    def close(self):
        self.env.close()


# ----------------------------------------------------------------------------------------------------------------
# group rollouts on ManiSkill


def test_group_members_start_from_the_same_state_and_perturbation_draw(tiny_cfg, tiny_policy):
    """Every member of a group resets from the same seed: same initial state (state vector and image), same
    perturbation entry (sample_per_episode) and draw (the perturbed first frame); groups differ from each other."""
    base = ResetRecorder(make_envs(tiny_cfg.env))
    env = PerturbedEnv(base, tiny_cfg.perturb.train, seed=3, sample_per_episode=True)
    try:
        torch.manual_seed(0)
        size = 3
        rollout = collect_groups(
            tiny_policy.eval(), env, num_groups=2, group_size=size, seed=40, max_steps=8, dynamic_sampling=False
        )
    finally:
        env.close()
    assert [seed for seed, _ in base.resets] == [40] * size  # one round of 2 groups (one per env), 3 passes
    first = base.resets[0][1]
    for _, obs in base.resets[1:]:
        assert torch.equal(obs["state"], first["state"]) and torch.equal(obs["rgb"], first["rgb"])
    assert not torch.equal(first["state"][0], first["state"][1]), "the two groups start from different states"

    assert rollout.groups_kept == 2 and rollout.outcomes.shape == (2, size)
    assert rollout.group_seeds.tolist() == [40, 41]
    starts = torch.cat(
        [torch.zeros(1, dtype=torch.long), (rollout.episode[1:] != rollout.episode[:-1]).nonzero()[:, 0] + 1]
    )
    assert len(starts) == 2 * size
    first_frames = rollout.rgb[starts].view(2, size, *rollout.rgb.shape[1:])
    for g in range(2):
        for j in range(1, size):
            assert torch.equal(first_frames[g, j], first_frames[g, 0]), f"group {g}: member {j} saw another frame"
    assert not torch.equal(first_frames[0, 0], first_frames[1, 0])
    # episodes are laid out per env (group) then pass (member): member j of group g is entry g * G + j
    setting = rollout.episodes["setting"].view(2, size)
    assert (setting >= 0).all() and (setting == setting[:, :1]).all(), "one perturbation entry per group"
    first_actions = rollout.actions[starts[:size]]
    assert not (first_actions == first_actions[:1]).all(), "members sample their own actions"


def test_group_rollout_layout_broadcasts_advantages_and_links_steps(tiny_cfg, tiny_policy):
    env = make_envs(tiny_cfg.env)
    try:
        torch.manual_seed(1)
        rollout = collect_groups(
            tiny_policy.eval(), env, 2, 2, seed=7, max_steps=8, outcome="return", dynamic_sampling=False
        )
    finally:
        env.close()
    lengths = torch.bincount(rollout.episode, minlength=4)
    assert torch.equal(lengths.float(), rollout.episodes["length"]), "one stored step per env step of each episode"
    assert torch.equal(rollout.outcomes.reshape(-1), rollout.episodes["return"])
    adv = rloo_advantages(rollout.outcomes)
    per_step = rollout.step_advantages(adv)
    for e in range(4):
        assert (per_step[rollout.episode == e] == adv.reshape(-1)[e]).all()
    idx = torch.arange(len(rollout))
    nxt, valid = rollout.next_indices(idx)
    ends = torch.cumsum(lengths, 0) - 1
    assert not valid[ends].any() and valid.sum() == len(rollout) - 4
    assert torch.equal(nxt[valid], idx[valid] + 1) and torch.equal(nxt[~valid], idx[~valid])
    obs = rollout.observations(idx[:3])
    assert obs["rgb"].shape == (3, 64, 64, 3) and len(obs["instruction"]) == 3


class CoinEnv(VecEnv):
    """One-step episodes: env i reset with seed s + i; an even seed succeeds when the action's first value is > 0,
    an odd seed never succeeds. So with a coin-flip policy, groups on odd seeds are all failures."""

    def __init__(self, num_envs: int):
        super().__init__(num_envs, torch.device("cpu"), 1, ["flip"] * num_envs)
        self.seeds = torch.zeros(num_envs, dtype=torch.long)

    def _obs(self):
        return {"rgb": (self.seeds % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 4, 4, 3).clone()}

    def _reset(self, seed):
        self.seeds = seed + torch.arange(self.num_envs)
        return self._obs()

    def _step(self, action):
        success = (self.seeds % 2 == 0) & (action[:, 0] > 0)
        done = torch.ones(self.num_envs, dtype=torch.bool)
        final = self._obs()
        self.seeds = self.seeds + 1000  # auto-reset to another seed
        return self._obs(), success.float(), done, torch.zeros_like(done), final, success

    def close(self):
        pass


class CoinPolicy:
    """Actions +-1 from its own generator (log-prob log 1/2), or always ``constant``."""

    device = torch.device("cpu")

    def __init__(self, seed, constant=None):
        self.generator, self.constant = torch.Generator().manual_seed(seed), constant

    def act(self, obs, deterministic=False):
        n = obs["rgb"].shape[0]
        action = (torch.randint(0, 2, (n, 1), generator=self.generator) * 2 - 1).float()
        if self.constant is not None:
            action.fill_(self.constant)
        return ActionSample(action, action, torch.full((n,), -0.6931), torch.zeros(n), action)


def test_dynamic_sampling_drops_uniform_groups_and_refills_them():
    env = CoinEnv(num_envs=2)  # per round: env 0 on an even seed (may be kept), env 1 on an odd one (dropped)
    rollout = collect_groups(CoinPolicy(0), env, num_groups=2, group_size=4, seed=10, max_steps=1, max_resample=3)
    assert rollout.groups_kept == 2
    assert all(seed % 2 == 0 for seed in rollout.group_seeds.tolist()), "only even-seed groups can be mixed"
    rounds = (rollout.group_seeds[-1].item() - 10) // 2 + 1  # round r resets with seed 10 + 2r
    assert rollout.groups_collected == 2 * rounds and rounds >= 2, "dropped groups were replaced in later rounds"
    assert all(0 < row.sum() < 4 for row in rollout.outcomes)
    assert len(rollout) == 8 and torch.equal(rollout.episode, torch.arange(8))

    # a bound: at most ceil(num_groups / N) + max_resample rounds, whatever is kept
    always_fails = CoinPolicy(0, constant=-1.0)
    never = collect_groups(always_fails, env, num_groups=3, group_size=4, seed=10, max_steps=1, max_resample=1)
    assert never.groups_kept == 0 and never.groups_collected == 2 * 3 and len(never) == 0  # 2 + 1 rounds
    assert never.episodes["success"].numel() == 6 * 4 and never.outcomes.shape == (0, 4)

    everything = collect_groups(always_fails, env, 2, 4, seed=10, max_steps=1, dynamic_sampling=False)
    assert everything.groups_kept == 2 and everything.groups_collected == 2


def test_rloo_run_where_nothing_succeeds_keeps_no_group_and_skips_the_update(tiny_cfg):
    """PickCube in 2 steps never succeeds: every group is dropped, the bound is hit and reported, nothing moves."""
    tiny_cfg.algorithm = "rloo"
    tiny_cfg.env.max_episode_steps = 2
    tiny_cfg.group.size, tiny_cfg.group.num_groups, tiny_cfg.group.max_resample = 2, 2, 1
    trainer = RobustPPOTrainer(tiny_cfg)
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train()
    assert metrics["groups/kept_frac"] == 0 and metrics["groups/collected"] == 4  # 2 rounds of 2 envs
    assert metrics["rollout/episodes"] == 8 and metrics["rollout/success_rate"] == 0
    assert metrics["ppo/optimizer_steps"] == 0
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))


# ----------------------------------------------------------------------------------------------------------------
# trust region to the base and drift diagnostics


def test_kl_to_base_is_zero_at_the_first_update_and_matches_a_recomputation_without_the_adapter(tiny_cfg):
    tiny_cfg.total_updates = 2
    tiny_cfg.kl_to_base = 0.1
    tiny_cfg.ppo.learning_rate = 1e-3  # so that the second rollout's policy is measurably off the base
    trainer = RobustPPOTrainer(tiny_cfg)
    measured, expected = [], []
    original = trainer.policy_metrics

    def check(rollout):
        policy = trainer.policy
        idx = torch.arange(rollout.log_probs.numel())
        actions = rollout.actions.reshape(-1, *rollout.actions.shape[2:])
        with torch.no_grad(), policy.peft_model.disable_adapter():
            ref = policy.evaluate(rollout.observations(idx), actions).log_prob
        r = ref - rollout.log_probs.reshape(-1)
        expected.append((r.exp() - r - 1).mean().item())
        metrics = original(rollout)
        measured.append(metrics["policy/kl_to_base"])
        return metrics

    trainer.policy_metrics = check
    metrics = trainer.train()
    assert measured[0] == 0.0, "LoRA starts as the identity: the first rollout's policy is the base"
    assert measured[1] > 1e-6
    assert measured == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert metrics["loss/kl_to_base"] > 0
    lines = [json.loads(line) for line in (Path(tiny_cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [row["policy/kl_to_base"] for row in lines] == measured


def test_kl_to_base_on_clean_frames_compares_the_policy_and_the_base_on_the_frames_before_perturbation(tiny_cfg):
    tiny_cfg.kl_to_base, tiny_cfg.kl_to_base_frames = 0.1, "clean"
    trainer, _, rollout = train_under_pixel_noise(tiny_cfg)
    policy = trainer.policy.eval()  # no dropout: values compared exactly
    idx = torch.arange(rollout.log_probs.numel())
    actions = rollout.flat(rollout.actions)
    with torch.no_grad(), policy.peft_model.disable_adapter():
        base_clean = policy.evaluate(rollout.clean_observations(idx), actions).log_prob
        base_seen = policy.evaluate(rollout.observations(idx), actions).log_prob
    torch.testing.assert_close(rollout.flat(rollout.ref_log_probs_clean), base_clean)
    assert (base_clean - base_seen).abs().max() > 1e-3, "the noise changed the base's log-probs"

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an adapter off the base, so the penalty is not 0
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    batch = make_batch(policy, rollout, trainer.cfg)
    mb = idx[:4]
    losses = compute_losses(policy, rollout, mb, batch, batch.advantages[mb], trainer.cfg)
    with torch.no_grad():
        current_clean = policy.evaluate(rollout.clean_observations(mb), actions[mb]).log_prob
    expected = kl_k3(current_clean, base_clean[mb]).mean()
    assert expected > 1e-3
    torch.testing.assert_close(losses.stats["loss/kl_to_base"], expected)
    torch.testing.assert_close(losses.terms["kl_to_base"], 0.1 * expected)


def test_kl_to_base_on_clean_frames_needs_ppo():
    with pytest.raises(ConfigError, match="kl_to_base_frames: 'clean' needs algorithm=ppo"):
        load_config(RECIPES / "tiny_cpu.yaml", ["algorithm=rloo", "kl_to_base=0.1", "kl_to_base_frames=clean"])


def test_argmax_changed_is_zero_before_the_first_step_and_counts_changed_tokens(tiny_cfg):
    trainer = RobustPPOTrainer(tiny_cfg)
    policy = trainer.policy.eval()
    rollout, _ = collect(policy, trainer.train_env, trainer.train_env.reset(seed=0), 4, 0.99)
    probe = make_probe(rollout, trainer.cfg.probe_frames)
    assert probe["rgb"].shape[0] == 8  # all 4 x 2 frames: fewer than probe_frames
    assert probe_drift(trainer.accelerator, policy, probe) == {
        "policy/argmax_changed": 0.0,
        "policy/argmax_shift": 0.0,
    }
    with torch.no_grad():
        for name, p in policy.peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    drift = probe_drift(trainer.accelerator, policy, probe)
    with torch.no_grad():
        ours = policy.act(probe, deterministic=True).action
        with policy.peft_model.disable_adapter():
            base = policy.act(probe, deterministic=True).action
    assert drift["policy/argmax_changed"] == pytest.approx((ours != base).float().mean().item())
    assert drift["policy/argmax_shift"] == pytest.approx((ours - base).abs().float().mean().item())
    assert 0 < drift["policy/argmax_changed"] <= 1 <= drift["policy/argmax_shift"] / drift["policy/argmax_changed"]


def test_the_reference_policy_restores_the_adapter(tiny_cfg):
    trainer = RobustPPOTrainer(tiny_cfg)
    policy = trainer.policy.eval()
    with torch.no_grad():
        for name, p in policy.peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    obs = {"rgb": torch.zeros(2, 64, 64, 3, dtype=torch.uint8), "instruction": ["pick up the cube"] * 2}
    actions = torch.zeros(2, 7, dtype=torch.long)
    with torch.no_grad():
        ours = policy.evaluate(obs, actions).log_prob
        with trainer.policy.reference():
            base = policy.evaluate(obs, actions).log_prob
        again = policy.evaluate(obs, actions).log_prob
    assert not torch.equal(ours, base) and torch.equal(ours, again)


# ----------------------------------------------------------------------------------------------------------------
# end to end


def test_rloo_end_to_end_writes_the_new_metrics(tiny_cfg):
    tiny_cfg.algorithm = "rloo"
    tiny_cfg.total_updates = 2
    tiny_cfg.kl_to_base = 0.05
    tiny_cfg.group.size, tiny_cfg.group.num_groups = 2, 2
    tiny_cfg.group.outcome = "return"  # the dense reward differs between members: every group is kept
    trainer = RobustPPOTrainer(tiny_cfg)
    value_head = {k: v.clone() for k, v in trainer.policy.value_head.state_dict().items()}
    trainer.train()
    rows = [json.loads(line) for line in (Path(tiny_cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for key in (
            "groups/kept_frac", "policy/kl_to_base", "policy/argmax_changed", "policy/temperature", "ppo/approx_kl",
            "ppo/clip_frac", "loss/ppo", "loss/kl_to_base", "rollout/success_rate",
        ):  # fmt: skip
            assert key in row, key
        assert row["groups/kept_frac"] == 1.0 and row["rollout/episodes"] == 4
        assert "loss/value" not in row and "ppo/explained_variance" not in row, "no critic"
        assert any(k.startswith("rollout/success_rate/") for k in row), "success per training perturbation"
    assert rows[0]["policy/kl_to_base"] == 0.0 and rows[0]["policy/argmax_changed"] == 0.0
    assert all(torch.equal(v, value_head[k]) for k, v in trainer.policy.value_head.state_dict().items())
    assert not any(p is q for p in trainer.params for q in trainer.policy.value_head.parameters())


def test_grpo_trains_an_action_chunk_policy(tmp_path):
    """The group path runs for a chunking family too (OpenVLA-OFT: one macro step = 2 env steps)."""
    cfg = load_config(
        RECIPES / "tiny_cpu.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            "model.name_or_path=builtin:tiny-openvla",
            "policy.family=openvla_oft",
            "policy.chunk_size=4",
            "policy.execute_steps=2",
            "lora.target_modules=null",
            "lora.adapt_output_layer=false",
            "env.task=PickCube-v1",
            "env.reward_mode=normalized_dense",
            "env.max_episode_steps=4",
            "algorithm=grpo",
            "group.size=2",
            "group.num_groups=2",
            "group.outcome=return",
            "kl_to_base=0.1",
            "total_updates=1",
            "eval_episodes=0",
            "report_to=[]",
            "ppo.num_minibatches=1",
            "ppo.update_epochs=1",
            "regularizers.jacobian.weight=0",
        ],
    )
    trainer = RobustPPOTrainer(cfg)
    heads = {k: v.clone() for k, v in trainer.policy.action_head.state_dict().items()}
    metrics = trainer.train()
    assert metrics["groups/samples"] == 2 * 2 * 2  # 4 episodes of 2 macro steps
    assert metrics["policy/kl_to_base"] == pytest.approx(0.0, abs=1e-6) and metrics["loss/kl_to_base"] >= 0
    # the base policy of an OFT adapter has the heads at their initial values, and they are restored after
    with torch.no_grad(), trainer.policy.reference():
        assert all(torch.equal(v, heads[k]) for k, v in trainer.policy.action_head.state_dict().items())
    assert any(not torch.equal(v, heads[k]) for k, v in trainer.policy.action_head.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# PPO that does not drift


def test_critic_warmup_trains_the_value_head_only(tiny_cfg):
    tiny_cfg.ppo.critic_warmup_updates = 1
    trainer = RobustPPOTrainer(tiny_cfg)
    trainer.policy.eval()
    rollout, _ = collect(trainer.policy, trainer.train_env, trainer.train_env.reset(seed=0), 4, 0.99)
    trainer.policy.train()
    value_ids = {id(p) for p in trainer.policy.value_head.parameters()}
    before = {id(p): p.detach().clone() for p in trainer.params}
    metrics = trainer.update(rollout)
    assert metrics["ppo/critic_warmup"] == 1.0 and "loss/ppo" not in metrics
    for p in trainer.params:
        if id(p) not in value_ids:
            assert torch.equal(p, before[id(p)]), "a policy weight moved during the critic warm-up"
    assert any(not torch.equal(p, before[id(p)]) for p in trainer.params if id(p) in value_ids)
    assert all(p.requires_grad for p in trainer.params), "the policy is unfrozen after the warm-up"
    trainer.update_index = 1
    assert "loss/ppo" in trainer.update(rollout)


def test_value_detach_features_keeps_the_value_loss_off_the_lora_weights(tiny_cfg):
    from helpers import fixed_obs

    obs = fixed_obs(2)
    actions = torch.zeros(2, 7, dtype=torch.long)
    grads = {}
    for detach in (False, True):
        tiny_cfg.ppo.value_detach_features = detach
        trainer = RobustPPOTrainer(tiny_cfg)
        torch.nn.init.normal_(trainer.policy.value_head.net[-1].weight)  # zero-initialised: no gradient through it
        trainer.policy.evaluate(obs, actions).value.pow(2).sum().backward()
        lora = [p.grad for n, p in trainer.policy.named_parameters() if "lora_B" in n]  # A gets none: B starts at 0
        grads[detach] = sum(0.0 if g is None else g.abs().sum().item() for g in lora)
        assert trainer.policy.value_head.net[0].weight.grad.abs().sum() > 0
    assert grads[False] > 0 and grads[True] == 0


def test_target_kl_stops_on_the_running_mean_of_the_epoch(tiny_cfg):
    tiny_cfg.ppo.update_epochs = 2
    tiny_cfg.ppo.num_minibatches = 2
    tiny_cfg.ppo.learning_rate = 1e-2  # a big first step: the second minibatch is far off
    trainer = RobustPPOTrainer(tiny_cfg)
    trainer.policy.eval()
    rollout, _ = collect(trainer.policy, trainer.train_env, trainer.train_env.reset(seed=0), 4, 0.99)
    trainer.policy.train()
    start = [p.detach().clone() for p in trainer.params]
    trainer.cfg.ppo.target_kl = 1e-6
    metrics = trainer.update(rollout)
    assert metrics["ppo/early_stopped"] == 1.0 and metrics["ppo/optimizer_steps"] in (1.0, 2.0)
    for p, s in zip(trainer.params, start, strict=True):
        p.data.copy_(s)
    trainer.cfg.ppo.target_kl = None
    metrics = trainer.update(rollout)
    assert metrics["ppo/early_stopped"] == 0.0 and metrics["ppo/optimizer_steps"] == 4.0


def test_batch_advantage_normalisation_and_ppo_per_perturbation_success(tiny_cfg):
    tiny_cfg.ppo.norm_adv = "batch"
    tiny_cfg.ppo.num_steps = 8  # episodes of 8 steps end inside the rollout
    tiny_cfg.ppo.clip_vloss = 0.5
    metrics = RobustPPOTrainer(tiny_cfg).train()
    for key in ("ppo/explained_variance", "loss/value", "policy/kl_to_base", "policy/argmax_changed"):
        assert key in metrics, key
    per_setting = {k: v for k, v in metrics.items() if k.startswith("rollout/success_rate/")}
    labels = {"pixel_noise@0.3", "action_noise@0.33", "shift@0.5", "rotation@0.5", "color_jitter@0.5"}
    assert per_setting and {k.split("/", 2)[2] for k in per_setting} <= labels


def test_config_keys_of_the_algorithms(tmp_path):
    def cfg(*overrides):
        return load_config(RECIPES / "tiny_cpu.yaml", list(overrides))

    assert cfg("ppo.norm_adv=true").ppo.norm_adv == "minibatch"
    assert cfg("ppo.norm_adv=false").ppo.norm_adv == "none"
    assert cfg("ppo.norm_adv=batch").ppo.norm_adv == "batch"
    assert cfg("ppo.clip_vloss=true").ppo.clip_vloss is True and cfg("ppo.clip_vloss=0.5").ppo.clip_vloss == 0.5
    assert cfg("algorithm=grpo", "group.size=4").group.size == 4
    with pytest.raises(ConfigError, match="norm_adv"):
        cfg("ppo.norm_adv=batches")
    with pytest.raises(ConfigError, match="algorithm"):
        cfg("algorithm=dpo")
    with pytest.raises(ConfigError, match="group.size"):
        cfg("algorithm=rloo", "group.size=1")
    with pytest.raises(ConfigError, match="critic_warmup"):
        cfg("algorithm=rloo", "ppo.critic_warmup_updates=2")
    with pytest.raises(ConfigError, match="clip_vloss"):
        cfg("ppo.clip_vloss=-1")


def test_k3_is_what_the_trainer_adds():
    """The loss term is the mean k3 of the new log-probs against the base's (a guard on the sign convention)."""
    new, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    r = ref - new
    assert torch.equal(kl_k3(new, ref), r.exp() - r - 1)
