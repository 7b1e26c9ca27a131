"""The policy families by name, with their LoRA defaults: a light catalogue (no torch, no transformers) that the
config reads to validate ``policy.family`` and the registry reads to build a policy."""

from __future__ import annotations

# Importing the classes is deferred (transformers is heavy); config validation only needs the names.
POLICY_FAMILIES = {
    "action_tokens": "rvla_peft.policies.openvla_style:ActionTokenPolicy",
    "openvla": "rvla_peft.policies.openvla:OpenVLAPolicy",
    "openvla_oft": "rvla_peft.policies.openvla_oft:OpenVLAOFTPolicy",
    "pi0": "rvla_peft.policies.pi0:Pi0Policy",
}

# OpenVLA's layers that never run, so never get a gradient: its features are the patch tokens after the
# second-to-last block of each vision tower, so the last block (DINOv2 ViT-L: 24 blocks, SigLIP So400m: 27) and
# SigLIP's attention-pool head are only there to load the checkpoint. peft's list form matches these as name
# suffixes. Written for the published dinosiglip-224px towers (openvla-7b and every OpenVLA-OFT checkpoint); the
# 3-block towers of builtin:tiny-openvla keep LoRA on their last block (zero-initialised, it stays zero).
OPENVLA_UNUSED_MODULES = [
    f"{tower}.blocks.{last}.{layer}"
    for tower, last in (("featurizer", 23), ("fused_featurizer", 26))
    for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
] + [f"attn_pool.{layer}" for layer in ("q", "kv", "proj", "mlp.fc1", "mlp.fc2")]

# LoRA per family, used for every lora.* key a recipe leaves unset. Action-token VLAs follow RL4VLA (r 32, alpha 16
# on every linear layer). A family whose modules peft cannot round-trip excludes them here.
LORA_DEFAULTS: dict[str, dict] = {
    "action_tokens": {"r": 32, "alpha": 16, "target_modules": "all-linear", "exclude_modules": None},
    # OpenVLA and OpenVLA-OFT (whose own fine-tuning used r 32, alpha 16, all-linear): all but the layers never run
    "openvla": {"r": 32, "alpha": 16, "target_modules": "all-linear", "exclude_modules": OPENVLA_UNUSED_MODULES},
    "openvla_oft": {"r": 32, "alpha": 16, "target_modules": "all-linear", "exclude_modules": OPENVLA_UNUSED_MODULES},
    # pi0: peft saves LoRA on the embed_action_time.* layers but drops it on reload (a key-renaming clash)
    "pi0": {
        "r": 32,
        "alpha": 16,
        "target_modules": "all-linear",
        "exclude_modules": ["action_in_proj", "state_proj", "action_time_mlp_in", "action_time_mlp_out"],
    },
}
