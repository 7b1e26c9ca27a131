"""Regenerate ``openvla_7b_keys.txt`` from the sources of openvla/openvla-7b (not run by the test suite).

The published ``model.safetensors`` is written by ``vla-scripts/extern/convert_openvla_weights_to_hf.py``, which
loads (strict) the Prismatic state dict into ``OpenVLAForActionPrediction`` (``prismatic/extern/hf/
modeling_prismatic.py``) and saves it. That model's parameters are:

- ``vision_backbone.featurizer.*`` / ``vision_backbone.fused_featurizer.*``: the two timm models exactly as the source
  creates them, ``timm.create_model(id, pretrained=False, num_classes=0, img_size=224, act_layer=None)`` with timm
  0.9.10 (OpenVLA's pin), after its ``ls_apply_patch``: LayerScale ``gamma`` -> ``scale_factor``;
- ``projector.fc1/fc2/fc3``: ``PrismaticProjector`` for fused backbones (Linear 2176 -> 8704 -> 4096 -> 4096);
- ``language_model.*``: ``LlamaForCausalLM`` of the default ``LlamaConfig`` with ``vocab_size = 32000 + 64``
  (``pad_to_multiple_of``); its rotary ``inv_freq`` is a non-persistent buffer, so not saved.

This script builds exactly that with the real timm code: ``pip download timm==0.9.10 --no-deps`` and unzip the wheel
into a folder given as the first argument. timm imports torchvision (for data transforms only, unused here), which
does not import beside this project's CPU torch: a stub module stands in for it.

    python tests/data/derive_openvla_7b_keys.py /tmp/timm-0.9.10 > tests/data/openvla_7b_keys.txt
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import math
import sys
import types

HEADER = """\
# Parameter names and shapes of openvla/openvla-7b's published weights (OpenVLAForActionPrediction): {count} tensors,
# {params:,} parameters. Written by tests/data/derive_openvla_7b_keys.py from the sources, not from the download
# (not reachable here): timm 0.9.10's ViTs built as modeling_prismatic.py builds them (LayerScale gamma renamed
# scale_factor, as its ls_apply_patch and convert_openvla_weights_to_hf.py do), the fused projector's fc1/fc2/fc3, and
# transformers' LlamaForCausalLM of the default LlamaConfig with vocab 32000 + 64. See that script's docstring.
# name shape"""


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _StubModule(types.ModuleType):
    __path__: list[str] = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubMeta(name, (), {"__init__": lambda self, *args, **kwargs: None})


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def featurizer_keys(timm, timm_id: str) -> tuple[dict[str, list[int]], int]:
    # on the CPU (timm reads its drop-path rates with .item()); weight_init="skip" only skips the random init
    model = timm.create_model(
        timm_id, pretrained=False, num_classes=0, img_size=224, act_layer=None, weight_init="skip"
    )
    rename = lambda key: key[: -len("gamma")] + "scale_factor" if key.endswith(".gamma") else key
    return {rename(k): list(v.shape) for k, v in model.state_dict().items()}, model.embed_dim


def main(timm_dir: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM  # before the stub: transformers probes torchvision

    sys.meta_path.insert(0, _TorchvisionStub())
    sys.path.insert(0, timm_dir)
    import timm
    import torch

    assert timm.__version__ == "0.9.10", timm.__version__
    keys: dict[str, list[int]] = {}
    dino, dino_dim = featurizer_keys(timm, "vit_large_patch14_reg4_dinov2.lvd142m")
    siglip, siglip_dim = featurizer_keys(timm, "vit_so400m_patch14_siglip_224")
    keys.update({f"vision_backbone.featurizer.{k}": v for k, v in dino.items()})
    keys.update({f"vision_backbone.fused_featurizer.{k}": v for k, v in siglip.items()})
    vision, llm = dino_dim + siglip_dim, 4096
    for name, (out, inp) in {"fc1": (4 * vision, vision), "fc2": (llm, 4 * vision), "fc3": (llm, llm)}.items():
        keys[f"projector.{name}.weight"], keys[f"projector.{name}.bias"] = [out, inp], [out]
    with torch.device("meta"):
        language_model = LlamaForCausalLM(LlamaConfig(vocab_size=32000 + 64, pad_token_id=32000))
    keys.update({f"language_model.{k}": list(v.shape) for k, v in language_model.state_dict().items()})
    print(HEADER.format(count=len(keys), params=sum(math.prod(s) for s in keys.values())))
    for name, shape in keys.items():
        print(name, ",".join(map(str, shape)))


if __name__ == "__main__":
    main(sys.argv[1])
