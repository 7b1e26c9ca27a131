"""Loading onto the GPU: ``from_pretrained`` gets ``device_map={"": device}`` for a GPU, so a 7B checkpoint loads
shard by shard onto the rank's GPU instead of whole into host memory on every rank. No GPU here: the GPU load is
recorded and run with the same device_map on the CPU (the real loading path, with its map)."""

import pytest
import torch
from conftest import RECIPES
from transformers import AutoModelForImageTextToText

from rvla_peft.config import load_config
from rvla_peft.policies import registry


def test_device_map_is_the_gpu_and_none_elsewhere():
    assert registry.load_device_map("cuda:1") == {"": torch.device("cuda:1")}
    assert registry.load_device_map(torch.device("cuda", 0)) == {"": torch.device("cuda:0")}
    assert registry.load_device_map("cpu") is None and registry.load_device_map(None) is None


def test_load_base_on_a_gpu_loads_with_its_device_map(monkeypatch):
    real = AutoModelForImageTextToText.from_pretrained.__func__
    seen = []

    def recording(cls, path, **kwargs):
        seen.append(kwargs.get("device_map"))
        if kwargs.get("device_map") is not None:  # no GPU here: the same map, onto the CPU
            kwargs["device_map"] = {"": torch.device("cpu")}
        return real(cls, path, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(recording))
    cfg = load_config(RECIPES / "tiny_cpu.yaml")
    on_gpu, _ = registry.load_base(cfg.model, torch.device("cuda:1"))
    on_cpu, _ = registry.load_base(cfg.model, "cpu")
    assert seen == [{"": torch.device("cuda:1")}, None]
    a, b = on_gpu.state_dict(), on_cpu.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_policy_loads_the_base_on_its_device(monkeypatch):
    class Loaded(Exception):
        pass

    devices = []

    def load_base(model_cfg, device=None):
        devices.append(device)
        raise Loaded

    monkeypatch.setattr(registry, "load_base", load_base)
    with pytest.raises(Loaded):
        registry.build_policy(load_config(RECIPES / "tiny_cpu.yaml"), device=torch.device("cuda:1"))
    assert devices == [torch.device("cuda:1")]
