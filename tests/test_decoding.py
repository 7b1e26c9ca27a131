"""``ActionTokenPolicy.act`` (KV-cached decoding in inference mode) against decoding written out in the test: a full
forward over the prompt and the tokens so far for every token (no cache), and the cached loop as it was before it
moved to inference mode (which must give the same bits), on the tiny builtin models."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import fixed_obs

from rvla_peft.config import load_config
from rvla_peft.policies.base import ActionSample
from rvla_peft.policies.common import positions
from rvla_peft.policies.registry import build_policy

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
MODELS = {
    "tiny-vla-maniskill": [],  # the recipe's pretrained base, 64 bins
    "tiny-llava": ["model.name_or_path=builtin:tiny-llava", "policy.n_bins=256"],
    "tiny-openvla": ["model.name_or_path=builtin:tiny-openvla", "policy.family=openvla", "policy.n_bins=256"],
}
OBS = {
    "same instruction": fixed_obs(2, seed=1, instructions=["push the cube to the goal"] * 2),
    "left padded": fixed_obs(3, seed=2, instructions=["pick up the cube", "push the cube to the goal region", "lift"]),
}
FIELDS = ("action", "env_action", "log_prob", "value", "mean")


@pytest.fixture(scope="module", params=list(MODELS))
def policy(request, tmp_path_factory):
    cfg = load_config(
        RECIPES / "tiny_cpu.yaml", [*MODELS[request.param], f"output_dir={tmp_path_factory.mktemp('run')}"]
    )
    torch.manual_seed(0)
    policy = build_policy(cfg).eval()
    with torch.no_grad():  # LoRA B starts at zero: make the adapter change the logits
        for name, p in policy.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return policy


def _dist(policy, logits: torch.Tensor, deterministic: bool):
    """Slot, log-prob and mean action of one action dimension from its full-vocabulary logits [B, V]."""
    logits = policy._dist_logits(logits)
    probs = logits.softmax(-1)
    slot = probs.argmax(-1) if deterministic else torch.multinomial(probs, 1).squeeze(-1)
    log_prob = logits.log_softmax(-1).gather(-1, slot[:, None]).squeeze(-1)
    return slot, log_prob, policy.action_tokenizer.expected_normalized(probs)


def _sample(policy, value, steps) -> ActionSample:
    slots, log_probs, means = (torch.stack(x, dim=1) for x in zip(*steps, strict=True))
    return ActionSample(slots, policy._env_action(slots), log_probs.sum(1), value, means)


@torch.no_grad()
def uncached_decoding(policy, obs, deterministic: bool) -> ActionSample:
    """One full forward (image, prompt and the action tokens so far) per action token."""
    ids, mask = policy.encode_prompts(obs["instruction"])
    pixel_values = policy.observation_inputs(obs)
    value, steps = None, []
    for _ in range(policy.cfg.action_dim):
        out = policy.peft_model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            position_ids=positions(mask),
            output_hidden_states=value is None,
        )
        if value is None:  # the last prompt token's hidden state
            value = policy.value_head(out.hidden_states[-1][:, -1])
        steps.append(_dist(policy, out.logits[:, -1], deterministic))
        ids = torch.cat([ids, steps[-1][0][:, None] + policy.action_tokenizer.first_id], dim=1)
        mask = F.pad(mask, (0, 1), value=1)
    return _sample(policy, value, steps)


@torch.no_grad()
def cached_decoding(policy, obs, deterministic: bool) -> ActionSample:
    """The dynamic KV cache under no-grad, the mask and positions grown token by token (``act`` before inference
    mode)."""
    out, mask, position_ids = policy._prompt_forward(obs, use_cache=True)
    value, steps = policy.value_head(out.hidden_states[-1][:, -1]), []
    for dim in range(policy.cfg.action_dim):
        steps.append(_dist(policy, out.logits[:, -1], deterministic))
        if dim + 1 == policy.cfg.action_dim:
            break
        mask = F.pad(mask, (0, 1), value=1)
        position_ids = position_ids[:, -1:] + 1
        out = policy.peft_model(
            input_ids=steps[-1][0][:, None] + policy.action_tokenizer.first_id,
            attention_mask=mask,
            position_ids=position_ids,
            cache=out.cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return _sample(policy, value, steps)


def _run(decode, policy, obs, deterministic: bool) -> tuple[ActionSample, torch.Tensor]:
    """The sample from seed 0, and a draw from the global generator after it (the same if ``decode`` drew as much)."""
    torch.manual_seed(0)
    sample = decode(policy, obs, deterministic)
    return sample, torch.rand(4)


@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled", "deterministic"])
@pytest.mark.parametrize("obs_name", list(OBS))
def test_act_is_the_decoding_written_out(policy, obs_name, deterministic):
    obs = OBS[obs_name]
    sample, after = _run(type(policy).act, policy, obs, deterministic)
    # the cached loop with the same ops: the same bits, and the same draws from the global generator
    old, old_after = _run(cached_decoding, policy, obs, deterministic)
    for name in FIELDS:
        assert torch.equal(getattr(sample, name), getattr(old, name)), name
    assert torch.equal(after, old_after)
    # without a cache: other matrix shapes round differently, by float32 ulps
    full, _ = _run(uncached_decoding, policy, obs, deterministic)
    assert torch.equal(sample.action, full.action) and torch.equal(sample.env_action, full.env_action)
    for name in ("log_prob", "value", "mean"):
        atol = 1e-4 if name == "log_prob" else 1e-5  # log_prob: a sum of 7, as test_policy compares it
        torch.testing.assert_close(getattr(sample, name), getattr(full, name), atol=atol, rtol=0, msg=name)
    # the sample is made of ordinary tensors (not inference tensors): callers may change it in place
    assert not any(getattr(sample, name).is_inference() for name in FIELDS)
    sample.env_action.add_(0.0)


@pytest.mark.slow  # compiling takes 1-3 minutes on 2 cores
def test_compiled_decoding_agrees_with_eager(tmp_path):
    """``policy.compile=true``: act's forwards through torch.compile give the eager policy's actions, and its
    log-probs, values and mean actions to float rounding; the compiled function adds no parameters."""
    overrides = [f"output_dir={tmp_path}"]
    eager = build_policy(load_config(RECIPES / "tiny_cpu.yaml", overrides)).eval()
    compiled = build_policy(load_config(RECIPES / "tiny_cpu.yaml", [*overrides, "policy.compile=true"])).eval()
    with torch.no_grad():  # the same non-zero adapter and value head in both
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            q.copy_(p.normal_(0, 0.02) if "lora_B" in name else p)
    assert len(list(compiled.parameters())) == len(list(eager.parameters()))
    for obs in OBS.values():  # two batch sizes: one graph with dynamic shapes, or a recompile, never a wrong answer
        for deterministic in (True, False):
            torch.manual_seed(0)
            a = compiled.act(obs, deterministic)
            torch.manual_seed(0)
            b = eager.act(obs, deterministic)
            assert torch.equal(a.action, b.action)
            for name in ("log_prob", "value", "mean"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=0, msg=name)
