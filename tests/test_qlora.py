"""QLoRA on CPU (a real 4-bit bitsandbytes base), LoRA defaults per family, and strict adapter loading."""

import json

import pytest
import torch
from helpers import fixed_obs
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from rvla_peft.policies.registry import LORA_DEFAULTS, build_policy, resolve_lora
from rvla_peft.regularizers import hutchinson_jacobian_sq_norm


@pytest.fixture
def qlora_cfg(tiny_cfg):
    tiny_cfg.model.quantization = "4bit"
    return tiny_cfg


def test_qlora_update_and_bit_exact_adapter_round_trip(qlora_cfg, tmp_path):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    policy = build_policy(qlora_cfg)
    linear = [m for m in policy.peft_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear) > 10 and all(m.weight.quant_state.quant_type == "nf4" for m in linear)
    assert linear[0].weight.quant_state.nested  # double quantization
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())

    obs = fixed_obs(2)
    policy.eval()
    with policy.acting():  # nothing is merged into a 4-bit base (merging would requantize it)
        assert not any(getattr(m, "merged", False) for m in policy.peft_model.modules())
        sample = policy.act(obs)  # a no-grad eval pass first: bitsandbytes' CPU repacking must not break training
    policy.train()
    out = policy.evaluate(obs, sample.action)
    torch.testing.assert_close(out.log_prob, sample.log_prob, atol=1e-4, rtol=0)
    with sdpa_kernel(SDPBackend.MATH):
        pixels = policy.observation_inputs(obs).requires_grad_(True)
        mean = policy.evaluate(obs, sample.action, pixel_values=pixels).mean
        jac = hutchinson_jacobian_sq_norm(mean, pixels, num_probes=1, create_graph=True).mean()
    loss = -(out.log_prob.mean()) + 0.1 * jac  # a policy-gradient step plus the Jacobian penalty
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    loss.backward()
    optimizer.step()
    changed = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed) and any("value_head" not in n for n in changed)

    policy.save_pretrained(tmp_path / "adapter", base_model_id="builtin:tiny-llava")
    reloaded = build_policy(qlora_cfg, adapter=tmp_path / "adapter")
    policy.eval()
    reloaded.eval()
    with torch.no_grad():
        a, b = policy.action_logits(obs, sample.action), reloaded.action_logits(obs, sample.action)
    assert torch.equal(a, b)


def test_lora_defaults_come_from_the_family_and_recipes_override_them(tiny_cfg):
    tiny_cfg.lora.r, tiny_cfg.lora.target_modules = None, None
    resolved = resolve_lora("action_tokens", tiny_cfg.lora)
    assert resolved.r == LORA_DEFAULTS["action_tokens"]["r"]
    assert resolved.target_modules == LORA_DEFAULTS["action_tokens"]["target_modules"]
    assert resolved.alpha == 16  # set by the recipe, kept
    tiny_cfg.lora.r = 4
    assert resolve_lora("action_tokens", tiny_cfg.lora).r == 4


def test_an_adapter_whose_weights_do_not_load_is_an_error(tiny_policy, tiny_cfg, tmp_path):
    """peft only warns about missing adapter keys; a half-loaded adapter must not pass as the trained one."""
    adapter = tmp_path / "adapter"
    tiny_policy.save_pretrained(adapter, base_model_id="builtin:tiny-llava")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    dropped = {k: v for k, v in weights.items() if "layers.0.self_attn.q_proj" not in k}
    assert len(dropped) < len(weights)
    save_file(dropped, str(adapter / "adapter_model.safetensors"))
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with pytest.raises(ValueError, match="did not load into the base model"):
        build_policy(tiny_cfg, adapter=adapter)
