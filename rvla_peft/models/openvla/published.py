"""The published ``openvla/openvla-7b`` ``config.json``, kept in the package so that code which only needs the
architecture (the 7B layout test, the memory estimate of ``python -m rvla_peft.train ... --dry-run``) works offline,
without downloading the checkpoint.

    config = AutoConfig.for_model(**OPENVLA_7B_CONFIG)  # after `import rvla_peft.models.openvla`
"""

from __future__ import annotations

from typing import Any

OPENVLA_7B_ID = "openvla/openvla-7b"

# openvla/openvla-7b's config.json as vla-scripts/extern/convert_openvla_weights_to_hf.py writes it (transformers
# 4.40's diff against the defaults; norm_stats cut to one dataset with illustrative numbers).
OPENVLA_7B_CONFIG: dict[str, Any] = {
    "arch_specifier": "no-align+fused-gelu-mlp",
    "architectures": ["OpenVLAForActionPrediction"],
    "auto_map": {
        "AutoConfig": "configuration_prismatic.OpenVLAConfig",
        "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
    },
    "hf_llm_id": "meta-llama/Llama-2-7b-hf",
    "image_resize_strategy": "resize-naive",
    "image_sizes": [224, 224],
    "llm_backbone_id": "llama2-7b-pure",
    "llm_max_length": 2048,
    "model_type": "openvla",
    "n_action_bins": 256,
    "norm_stats": {
        "bridge_orig": {
            "action": {
                "q01": [-0.03, -0.04, -0.03, -0.1, -0.1, -0.2, 0.0],
                "q99": [0.03, 0.04, 0.04, 0.1, 0.1, 0.2, 1.0],
                "mask": [True, True, True, True, True, True, False],
            }
        }
    },
    "output_projector_states": False,
    "pad_to_multiple_of": 64,
    "pad_token_id": 32000,
    "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064},
    "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "timm_override_act_layers": [None, None],
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_fused_vision_backbone": True,
    "vision_backbone_id": "dinosiglip-vit-so-224px",
}

__all__ = ["OPENVLA_7B_CONFIG", "OPENVLA_7B_ID"]
