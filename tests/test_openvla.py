"""Native OpenVLA: the published checkpoint's names and shapes, the Auto-class round trip, the forward against the
source's composition, cached decoding, and the ``openvla`` policy family on ``builtin:tiny-openvla``."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fixed_obs
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from rvla_peft.algorithms.ppo import policy_loss, value_loss
from rvla_peft.config import ConfigError, load_config
from rvla_peft.models.openvla import OpenVLAConfig, OpenVLAForActionPrediction, PrismaticProcessor
from rvla_peft.models.openvla.published import OPENVLA_7B_CONFIG as PUBLISHED_CONFIG
from rvla_peft.models.tiny import resolve_builtin
from rvla_peft.policies.common import action_bounds_from_norm_stats
from rvla_peft.policies.openvla.modeling import OpenVLAPolicy
from rvla_peft.regularizers import grad_norm_penalty, hutchinson_jacobian_sq_norm

DATA = Path(__file__).parent / "data"
RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# openvla/openvla-7b's config.json, kept in the package (rvla_peft.models.openvla.published).
# ... and its preprocessor_config.json: PrismaticImageProcessor from timm's data configs of the two towers, saved with
# the tvf_* values it derives from them (and recomputes on load, as the native class does).
PUBLISHED_PREPROCESSOR = {
    "auto_map": {
        "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
        "AutoProcessor": "processing_prismatic.PrismaticProcessor",
    },
    "image_processor_type": "PrismaticImageProcessor",
    "image_resize_strategy": "resize-naive",
    "input_sizes": [[3, 224, 224], [3, 224, 224]],
    "interpolations": ["bicubic", "bicubic"],
    "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
    "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
    "processor_class": "PrismaticProcessor",
    "tvf_crop_params": [{"output_size": [224, 224]}, {"output_size": [224, 224]}],
    "tvf_do_letterbox": False,
    "tvf_letterbox_fill": None,
    "tvf_normalize_params": [
        {"inplace": False, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        {"inplace": False, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    ],
    "tvf_resize_params": [
        {"antialias": True, "interpolation": 3, "max_size": None, "size": [224, 224]},
        {"antialias": True, "interpolation": 3, "max_size": None, "size": [224, 224]},
    ],
    "use_fused_vision_backbone": True,
}


def _published_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (DATA / "openvla_7b_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split()
            keys[name] = tuple(int(s) for s in shape.split(","))
    return keys


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return resolve_builtin("builtin:tiny-openvla")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    return model, AutoProcessor.from_pretrained(tiny_dir)


def _inputs(processor, prompts: list[str], seed: int = 0) -> dict:
    """Left-padded prompts and random images, as the policy feeds them."""
    rgb = fixed_obs(len(prompts), seed=seed)["rgb"]
    enc = [processor.tokenizer(p)["input_ids"] for p in prompts]
    length = max(map(len, enc))
    ids = torch.zeros(len(enc), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(enc):
        ids[row, length - len(e) :], mask[row, length - len(e) :] = torch.tensor(e), 1
    pixels = processor.image_processor([Image.fromarray(x.numpy()) for x in rgb], return_tensors="pt")["pixel_values"]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


# ---------------------------------------------------------------------------------------------------------------
# the 7B checkpoint's layout


def test_7b_parameter_names_and_shapes_are_the_published_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    config = AutoConfig.from_pretrained(tmp_path)  # the published file, its auto_map and no trust_remote_code
    assert isinstance(config, OpenVLAConfig) and config.num_image_tokens == 256 and config.vision_embed_dim == 2176
    assert config.action_vocab_size == 32000 and config.text_config.rms_norm_eps == 1e-6
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert isinstance(model, OpenVLAForActionPrediction)
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    published = _published_keys()
    assert set(ours) == set(published), (
        sorted(set(ours) - set(published))[:5],
        sorted(set(published) - set(ours))[:5],
    )
    assert ours == published
    total = sum(math.prod(shape) for shape in ours.values())
    assert total == sum(p.numel() for p in model.parameters()) == 7_541_237_184  # "7.54B params"


def test_published_processor_files_load_into_the_native_classes(tmp_path, tiny_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((Path(tiny_dir) / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PUBLISHED_PREPROCESSOR))
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, PrismaticProcessor)
    image = Image.fromarray(fixed_obs(1, size=100)["rgb"][0].numpy())
    pixels = processor(text="In: x?\nOut:", images=image)["pixel_values"]
    assert pixels.shape == (1, 6, 224, 224)
    torch.testing.assert_close(pixels, image_processor(image, return_tensors="pt")["pixel_values"])
    # DINOv2's normalisation in the first 3 channels, SigLIP's in the last 3, on a bicubic resize of the image
    resized = np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    for tower, (mean, std) in enumerate(
        zip(PUBLISHED_PREPROCESSOR["means"], PUBLISHED_PREPROCESSOR["stds"], strict=True)
    ):
        expected = torch.from_numpy(((resized - np.array(mean)) / np.array(std)).transpose(2, 0, 1)).float()
        torch.testing.assert_close(pixels[0, 3 * tower : 3 * tower + 3], expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# the tiny model through the Auto classes


def test_save_and_reload_through_the_auto_classes_is_bit_exact(tiny, tmp_path):
    from safetensors import safe_open

    model, processor = tiny
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # written under the checkpoint's names, unmapped
        assert set(f.keys()) == set(model.state_dict())
    again, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    again.eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    inputs = _inputs(processor, ["In: lift it?\nOut:", "In: put the cube down?\nOut:"])
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.equal(logits, again(**inputs).logits)
    assert logits.shape == (2, inputs["input_ids"].shape[1] + model.config.num_image_tokens, 512)


def test_forward_is_the_sources_composition(tiny):
    """Unpadded, the source's forward: patches after BOS, then the language model on the joint sequence."""
    model, processor = tiny
    inputs = _inputs(processor, ["In: open the drawer?\nOut:"] * 2)
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        out = model(**inputs, labels=labels, output_projector_features=True)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        patches = model.projector(model.vision_backbone(inputs["pixel_values"]))
        joint = torch.cat([embeds[:, :1], patches, embeds[:, 1:]], dim=1)
        ignore = torch.full(patches.shape[:2], -100)
        reference = model.language_model(
            inputs_embeds=joint,
            attention_mask=torch.ones(joint.shape[:2], dtype=torch.long),
            labels=torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1),
        )
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, reference.loss)
    assert torch.equal(out.projector_features, patches)


def test_cached_decoding_equals_the_full_forward_with_left_padding(tiny):
    model, processor = tiny
    prompts = ["In: pick?\nOut:", "In: push the cube to the goal?\nOut:"]
    inputs = _inputs(processor, prompts)
    new_tokens = torch.tensor([[300, 301, 302], [310, 311, 312]])
    full_mask = torch.cat([inputs["attention_mask"], torch.ones_like(new_tokens)], dim=1)
    with torch.no_grad():
        full = model(
            input_ids=torch.cat([inputs["input_ids"], new_tokens], dim=1),
            attention_mask=full_mask,
            pixel_values=inputs["pixel_values"],
            position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
        ).logits
        for pass_positions in (True, False):  # text positions given, or derived from the mask
            mask = inputs["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(**inputs, position_ids=positions if pass_positions else None, use_cache=True)
            steps = [out.logits[:, -1]]
            for k in range(new_tokens.shape[1]):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
                out = model(
                    input_ids=new_tokens[:, k : k + 1],
                    attention_mask=mask,
                    position_ids=positions if pass_positions else None,
                    cache=out.cache,
                    use_cache=True,
                )
                steps.append(out.logits[:, -1])
            torch.testing.assert_close(torch.stack(steps, 1), full[:, -4:], atol=1e-5, rtol=0)
        # each padded row alone gives its own result
        for row in range(2):
            alone = _inputs(processor, prompts[row : row + 1])
            alone["pixel_values"] = inputs["pixel_values"][row : row + 1]
            torch.testing.assert_close(model(**alone).logits[0, -1], full[row, -4], atol=1e-5, rtol=0)


def test_generate_with_the_cache_is_greedy_decoding_without_it(tiny):
    model, processor = tiny
    inputs = _inputs(processor, ["In: stack the cubes?\nOut:"])
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        ids = inputs["input_ids"]
        for _ in range(4):  # no cache: the whole sequence every step
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


def test_eager_and_sdpa_agree_and_both_differentiate_twice(tiny_dir, tiny):
    _, processor = tiny
    inputs = _inputs(processor, ["In: lift?\nOut:"])
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = AutoModelForImageTextToText.from_pretrained(tiny_dir, attn_implementation=implementation)
        # the ViTs read the top-level setting, the language model its own
        assert model.config._attn_implementation == model.language_model.config._attn_implementation == implementation
        pixels = inputs["pixel_values"].clone().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # the CPU's fused SDPA kernel has no double backward
            logits = model(**{**inputs, "pixel_values": pixels}).logits[:, -1]
            (grad,) = torch.autograd.grad(logits.logsumexp(-1).sum(), pixels, create_graph=True)
            grad.pow(2).sum().backward()
        assert model.projector.fc1.weight.grad.abs().sum() > 0
        outputs[implementation] = logits.detach()
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# the openvla policy family


@pytest.fixture
def openvla_cfg(tmp_path):
    return load_config(
        RECIPES / "tiny_cpu.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            "model.name_or_path=builtin:tiny-openvla",
            "policy.family=openvla",
            "policy.n_bins=256",
            "report_to=[]",
        ],
    )


@pytest.fixture
def openvla_policy(openvla_cfg):
    from rvla_peft.policies.registry import build_policy

    torch.manual_seed(0)
    return build_policy(openvla_cfg)


def test_policy_samples_openvla_action_ids_and_evaluate_recomputes_them(openvla_policy):
    policy = openvla_policy
    assert isinstance(policy, OpenVLAPolicy)
    # 512 rows, the last 64 padding: actions are ids 192..447, as 31744..31999 in openvla-7b
    assert policy.action_tokenizer.first_id == 192 and policy.action_tokenizer.vocab_size == 448
    obs = fixed_obs(4, instructions=["pick up the red cube", "push the cube to the goal region please"] * 2)
    torch.manual_seed(1)
    sample = policy.act(obs)
    assert sample.action.shape == (4, 7) and torch.isfinite(sample.log_prob).all()
    out = policy.evaluate(obs, sample.action)
    torch.testing.assert_close(out.log_prob, sample.log_prob, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.mean, sample.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.value, sample.value, atol=1e-5, rtol=0)
    for row in (0, 1):  # left padding changes nothing
        single = {"rgb": obs["rgb"][row : row + 1], "instruction": obs["instruction"][row : row + 1]}
        alone = policy.evaluate(single, sample.action[row : row + 1])
        torch.testing.assert_close(alone.log_prob, out.log_prob[row : row + 1], atol=1e-4, rtol=0)
    greedy = policy.act(obs, deterministic=True).action
    assert torch.equal(policy.action_logits(obs, greedy).argmax(-1), greedy)
    # the device-side preprocessing is the processor's (6 channels: one normalisation per tower)
    images = [Image.fromarray(x.numpy()) for x in obs["rgb"]]
    theirs = policy.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(policy.observation_inputs(obs), theirs, atol=1e-5, rtol=0)


def test_prompt_ends_with_the_empty_word_token_when_the_tokenizer_has_one(openvla_policy):
    assert openvla_policy.empty_word_id is None  # the tiny character tokenizer has no "▁"
    plain = openvla_policy._prompt("lift the cube")
    assert plain[0] == openvla_policy.processor.tokenizer.bos_token_id
    openvla_policy.empty_word_id, openvla_policy._prompt_ids = 7, {}  # as 29871 in Llama-2's vocabulary
    assert torch.equal(openvla_policy._prompt("lift the cube"), torch.cat([plain, torch.tensor([7])]))


def test_ppo_and_both_penalties_update_the_lora_weights_and_the_adapter_reloads_bit_exactly(
    openvla_policy, openvla_cfg, tmp_path
):
    from peft import PeftModel

    from rvla_peft.policies.registry import build_policy, load_base

    policy = openvla_policy
    obs = fixed_obs(4)
    torch.manual_seed(2)
    sample = policy.act(obs)
    params = policy.trainable_parameters()
    before = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    out = policy.evaluate(obs, sample.action)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss = policy_loss(out.log_prob, sample.log_prob, advantages, 0.2)[0]
    loss = loss + 0.5 * value_loss(out.value, sample.value, torch.ones(4), 0.2)
    with sdpa_kernel(SDPBackend.MATH):
        pixels = policy.observation_inputs(obs).detach().requires_grad_(True)
        mean = policy.evaluate(obs, sample.action, pixel_values=pixels).mean
        jacobian = hutchinson_jacobian_sq_norm(mean, pixels, 1, generator=torch.Generator().manual_seed(0))
        with policy.capture_visual_embeddings() as captured:
            log_prob = policy.evaluate(obs, sample.action).log_prob
        penalty = grad_norm_penalty(log_prob, captured[0], g_max=10.0)
    assert captured[0].shape == (4, 16, 64) and (jacobian > 0).all() and (penalty > 0).all()
    (loss + 0.1 * jacobian.mean() + 0.1 * penalty.mean()).backward()
    optimizer.step()
    moved = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n and "language_model" in n for n in moved)
    assert any("lora_B" in n and "vision_backbone" in n for n in moved)

    policy.eval()
    policy.save_pretrained(tmp_path / "adapter", base_model_id="openvla/openvla-7b")
    base, _ = load_base(openvla_cfg.model)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    trained = {n: p for n, p in policy.peft_model.state_dict().items() if "lora_" in n}
    restored = reloaded.state_dict()
    assert trained and all(torch.equal(p, restored[n]) for n, p in trained.items())
    ids, mask = policy.encode_prompts(obs["instruction"])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=policy.observation_inputs(obs))
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, policy.peft_model(**inputs).logits)
    again = build_policy(openvla_cfg, adapter=tmp_path / "adapter").eval()
    with torch.no_grad():
        a, b = policy.evaluate(obs, sample.action), again.evaluate(obs, sample.action)
    assert torch.equal(a.log_prob, b.log_prob) and torch.equal(a.value, b.value)


def test_norm_stats_unnormalise_as_predict_action_does(openvla_policy, openvla_cfg):
    stats = PUBLISHED_CONFIG["norm_stats"]
    low, high = action_bounds_from_norm_stats(stats, "bridge_orig")
    assert low == [-0.03, -0.04, -0.03, -0.1, -0.1, -0.2, -1.0] and high == [0.03, 0.04, 0.04, 0.1, 0.1, 0.2, 1.0]
    with pytest.raises(ValueError, match="bridge_orig"):
        action_bounds_from_norm_stats(stats, "fractal")

    base = openvla_policy.peft_model.get_base_model()
    base.config.norm_stats = stats
    openvla_cfg.policy.unnorm_key = "bridge_orig"
    policy = OpenVLAPolicy(openvla_policy.peft_model, openvla_policy.processor, openvla_cfg.policy, 64)
    # OpenVLAForActionPrediction.predict_action, on token ids
    token_ids = np.array([447, 446, 320, 192, 193, 300, 200])
    vocab_size, bins = 448, np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2.0
    normalized = centers[np.clip(vocab_size - token_ids - 1, 0, centers.shape[0] - 1)]
    action = stats["bridge_orig"]["action"]
    q01, q99, mask = (np.array(action[k]) for k in ("q01", "q99", "mask"))
    expected = np.where(mask, 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)
    ours = policy._env_action(torch.from_numpy(token_ids - 192)[None])[0]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6, rtol=0)
    # by hand: OpenVLA counts bins down from the end of the vocabulary, so the last action id (447) is the lowest
    # bin centre, -1 + 1/255, just above q01 = -0.03 in a dimension spanning 0.06; the gripper passes through
    assert ours[0].item() == pytest.approx(0.5 * (1 / 255) * 0.06 - 0.03, abs=1e-7)
    assert ours[6].item() == pytest.approx(centers[448 - 200 - 1], abs=1e-7)


def test_unnorm_key_is_checked_by_the_config_and_the_recipe_validates():
    with pytest.raises(ConfigError, match="policy.unnorm_key"):
        load_config(
            None, ["policy.family=openvla", "policy.unnorm_key=bridge_orig", "policy.action_low=[0,0,0,0,0,0,0]"]
        )
    with pytest.raises(ConfigError, match="policy.unnorm_key"):
        load_config(None, ["policy.unnorm_key=bridge_orig"])  # family action_tokens
    cfg = load_config(RECIPES / "openvla_maniskill.yaml")
    assert cfg.model.name_or_path == "openvla/openvla-7b" and cfg.policy.family == "openvla"
