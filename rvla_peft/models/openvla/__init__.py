"""Native OpenVLA for transformers 5: importing this package registers ``model_type="openvla"`` with the Auto
classes, so ``AutoModelForImageTextToText.from_pretrained("openvla/openvla-7b")`` and
``AutoProcessor.from_pretrained("openvla/openvla-7b")`` load the published checkpoint with this code (no remote code,
no timm, no key mapping).

``AutoModelForVision2Seq``, the class the checkpoint's ``auto_map`` names, no longer exists in transformers 5; its
successor ``AutoModelForImageTextToText`` is registered.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from rvla_peft.models.openvla.configuration import OpenVLAConfig
from rvla_peft.models.openvla.modeling import (
    OpenVLACausalLMOutputWithPast,
    OpenVLAForActionPrediction,
    PrismaticPreTrainedModel,
)
from rvla_peft.models.openvla.processing import PrismaticImageProcessor, PrismaticProcessor

AutoConfig.register(OpenVLAConfig.model_type, OpenVLAConfig, exist_ok=True)
AutoModelForImageTextToText.register(OpenVLAConfig, OpenVLAForActionPrediction, exist_ok=True)
AutoImageProcessor.register(OpenVLAConfig, image_processor_classes={"pil": PrismaticImageProcessor}, exist_ok=True)
AutoProcessor.register(OpenVLAConfig, PrismaticProcessor, exist_ok=True)

__all__ = [
    "OpenVLAConfig",
    "OpenVLAForActionPrediction",
    "OpenVLACausalLMOutputWithPast",
    "PrismaticPreTrainedModel",
    "PrismaticImageProcessor",
    "PrismaticProcessor",
]
