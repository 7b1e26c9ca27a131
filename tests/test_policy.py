"""The action-token policy on a real tiny Llava loaded through from_pretrained, with a real peft LoRA."""

import numpy as np
import torch
from helpers import fixed_obs
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from rvla_peft.regularizers import exact_jacobian_sq_norm, hutchinson_jacobian_sq_norm


def test_act_log_prob_matches_teacher_forced_evaluate(tiny_policy):
    obs = fixed_obs(4)
    torch.manual_seed(1)
    sample = tiny_policy.act(obs)
    assert sample.action.shape == (4, 7) and sample.action.dtype == torch.long
    assert sample.env_action.shape == (4, 7) and sample.env_action.abs().max() <= 1
    out = tiny_policy.evaluate(obs, sample.action)
    torch.testing.assert_close(out.log_prob, sample.log_prob, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.mean, sample.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.value, sample.value, atol=1e-5, rtol=0)
    assert torch.isfinite(out.entropy).all() and (out.entropy <= 7 * np.log(256) + 1e-3).all()


def test_deterministic_act_is_argmax_and_repeatable(tiny_policy):
    obs = fixed_obs(2)
    a, b = tiny_policy.act(obs, deterministic=True), tiny_policy.act(obs, deterministic=True)
    assert torch.equal(a.action, b.action)
    logits = tiny_policy.action_logits(obs, a.action)
    assert torch.equal(logits.argmax(-1), a.action)


def _lora_layers(policy):
    from peft.tuners.lora import LoraLayer

    return [m for m in policy.peft_model.modules() if isinstance(m, LoraLayer)]


def test_acting_merges_the_lora_and_puts_the_weights_back_bit_for_bit(tiny_policy):
    with torch.no_grad():  # a trained-looking adapter: LoRA B != 0, so merging changes the weights
        for name, p in tiny_policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    tiny_policy.eval()
    obs = fixed_obs(2)
    unmerged = tiny_policy.act(obs, deterministic=True)
    before = {k: v.clone() for k, v in tiny_policy.state_dict().items()}
    with tiny_policy.acting():
        assert all(layer.merged for layer in _lora_layers(tiny_policy))
        changed = [k for k, v in tiny_policy.state_dict().items() if k in before and not torch.equal(v, before[k])]
        assert changed and all("base_layer" in k for k in changed)
        merged = tiny_policy.act(obs, deterministic=True)
    assert torch.equal(merged.action, unmerged.action)
    torch.testing.assert_close(merged.log_prob, unmerged.log_prob, atol=1e-4, rtol=0)
    torch.testing.assert_close(merged.mean, unmerged.mean, atol=1e-5, rtol=0)
    # the update's teacher-forced forward (LoRA unmerged) scores the merged rollout's actions alike
    torch.testing.assert_close(tiny_policy.evaluate(obs, merged.action).log_prob, merged.log_prob, atol=1e-4, rtol=0)
    after = tiny_policy.state_dict()
    assert not any(layer.merged for layer in _lora_layers(tiny_policy))
    assert all(torch.equal(after[k], v) for k, v in before.items())
    try:  # an error inside the block restores the weights too
        with tiny_policy.acting():
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert all(torch.equal(tiny_policy.state_dict()[k], v) for k, v in before.items())


def test_acting_merges_nothing_when_switched_off_or_the_adapter_is_disabled(tiny_policy):
    with tiny_policy.peft_model.disable_adapter(), tiny_policy.acting():
        assert not any(layer.merged for layer in _lora_layers(tiny_policy))
    tiny_policy.cfg.merge_lora_to_act = False
    with tiny_policy.acting():
        assert not any(layer.merged for layer in _lora_layers(tiny_policy))


def test_mixed_instructions_are_left_padded_without_changing_results(tiny_policy):
    obs = fixed_obs(2, instructions=["pick up the red cube", "push the cube to the goal region please"])
    sample = tiny_policy.act(obs)
    batched = tiny_policy.evaluate(obs, sample.action)
    for row in range(2):
        single = {"rgb": obs["rgb"][row : row + 1], "instruction": obs["instruction"][row : row + 1]}
        alone = tiny_policy.evaluate(single, sample.action[row : row + 1])
        torch.testing.assert_close(alone.log_prob, batched.log_prob[row : row + 1], atol=1e-4, rtol=0)


def test_pixel_preprocessing_matches_the_processor(tiny_policy):
    obs = fixed_obs(2)
    ours = tiny_policy.observation_inputs(obs)
    images = [Image.fromarray(x.numpy()) for x in obs["rgb"]]
    theirs = tiny_policy.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_hutchinson_matches_exact_jacobian_of_the_vla(tiny_policy):
    """1000 Rademacher probes: within 5% of ||d mean_action / d pixel_values||_F^2 computed with torch.func.

    Checked on the batch mean, which is what the penalty trains on: the 7 rows of this Jacobian are strongly
    correlated, which gives a single sample's estimate a few percent of spread even at 1000 probes."""
    obs = fixed_obs(4)
    actions = tiny_policy.act(obs).action
    pixels = tiny_policy.observation_inputs(obs)

    def mean_fn_of(row):  # the mean action of one sample, teacher-forced on that sample's own action tokens
        return lambda x: (
            tiny_policy.evaluate({"instruction": obs["instruction"][row : row + 1]}, actions[row : row + 1], x).mean
        )

    with sdpa_kernel(SDPBackend.MATH):
        exact = torch.cat([exact_jacobian_sq_norm(mean_fn_of(row), pixels[row : row + 1]) for row in range(4)])
        x = pixels.clone().requires_grad_(True)
        mean = tiny_policy.evaluate(obs, actions, pixel_values=x).mean
        g = torch.Generator().manual_seed(0)
        estimate = hutchinson_jacobian_sq_norm(mean, x, num_probes=1000, generator=g, create_graph=False)
    assert (exact > 0).all()
    assert ((estimate - exact).abs() / exact).max() < 0.15, (estimate, exact)
    assert ((estimate.mean() - exact.mean()).abs() / exact.mean()) < 0.05, (estimate, exact)


def test_penalty_gradient_wrt_lora_weight_matches_finite_differences(tiny_policy):
    policy = tiny_policy.double()
    # LoRA B starts at zero, which would make d/dA vanish trivially: give the adapter nonzero weights first.
    torch.manual_seed(0)
    for name, p in policy.peft_model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.05)
    obs = fixed_obs(2)
    actions = policy.act(obs).action
    pixels = policy.observation_inputs(obs).detach()

    def penalty() -> torch.Tensor:
        x = pixels.clone().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):
            mean = policy.evaluate(obs, actions, pixel_values=x).mean
            g = torch.Generator().manual_seed(3)  # fixed probes: a deterministic function of the weights
            return hutchinson_jacobian_sq_norm(mean, x, num_probes=2, generator=g).sum()

    named = dict(policy.peft_model.named_parameters())
    for key in (
        "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.vision_tower.encoder.layers.0.mlp.fc1.lora_B.default.weight",
    ):
        weight = named[key]
        policy.zero_grad()
        penalty().backward()
        analytic = weight.grad[0, 0].item()
        # Llama's RMSNorm runs in float32 even in a float64 model, so values carry ~1e-7 relative noise: a wide
        # central difference (truncation error ~eps^2) keeps that noise far below the 1% tolerance.
        eps = 1e-2
        original = weight.data[0, 0].item()
        weight.data[0, 0] = original + eps
        plus = penalty().item()
        weight.data[0, 0] = original - eps
        minus = penalty().item()
        weight.data[0, 0] = original
        numeric = (plus - minus) / (2 * eps)
        assert abs(analytic) > 1e-8, key
        assert abs(analytic - numeric) <= 1e-2 * abs(numeric), (key, analytic, numeric)


def test_value_head_is_saved_beside_not_inside_the_adapter(tiny_policy, tmp_path):
    from safetensors.torch import load_file

    tiny_policy.save_pretrained(tmp_path, base_model_id="builtin:tiny-llava")
    adapter_keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert adapter_keys and all("lora_" in k for k in adapter_keys)
    assert set(load_file(tmp_path / "value_head.safetensors")) == {
        "net.0.weight",
        "net.0.bias",
        "net.2.weight",
        "net.2.bias",
    }
    import json

    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "builtin:tiny-llava"
    )


def test_output_layer_is_adapted_when_asked(tiny_policy, tiny_cfg):
    names = [n for n, _ in tiny_policy.peft_model.named_parameters() if "lora_A" in n]
    assert any("lm_head" in n for n in names) == tiny_cfg.lora.adapt_output_layer is True
    assert any("vision_tower" in n for n in names) and any("multi_modal_projector" in n for n in names)


def test_base_loads_without_hub_kernels(tiny_policy):
    # transformers 5 kernelizes by default (Hub code fetched at load and at .train()): the policy keeps its own layers
    base = tiny_policy.peft_model.get_base_model()
    tiny_policy.train()
    assert base.use_kernels is False and base.kernels_mode is None
