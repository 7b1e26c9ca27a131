"""Policy families as folders: each owns its ``policy:`` keys (a flat recipe section parsed into the family's class),
its LoRA defaults and its memory hooks; the light catalogue and the registry agree; shared maths has one home."""

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import RECIPES

from rvla_peft.config import ConfigError, LoraSettings, PolicyConfig, TrainConfig, dump_yaml, help_text, load_config
from rvla_peft.policies import distributions, families, registry
from rvla_peft.policies.action_tokens.configuration import ActionTokenPolicyConfig
from rvla_peft.policies.action_tokens.tokenizer import ActionTokenizer
from rvla_peft.policies.base import MemoryHooks, Policy
from rvla_peft.policies.common import unnormalize_actions
from rvla_peft.policies.openvla.configuration import OpenVLAPolicyConfig
from rvla_peft.policies.openvla_oft.configuration import OpenVLAOFTPolicyConfig
from rvla_peft.policies.pi0.configuration import Pi0PolicyConfig

PACKAGE = Path(__file__).resolve().parent.parent / "rvla_peft"
NO_LOGITS = ["lora.adapt_output_layer=false"]  # tiny_cpu.yaml adapts lm_head, which OpenVLA-OFT never runs

# The policy section as recipe.yaml files saved before the families had their own classes: every field of every
# family, at the defaults (pushed adapters carry such files; they must keep loading).
OLD_POLICY_SECTION = {
    "family": "action_tokens",
    "prompt_template": "In: What action should the robot take to {instruction}?\nOut:",
    "action_dim": 7,
    "n_bins": 256,
    "action_low": None,
    "action_high": None,
    "unnorm_key": None,
    "value_head_hidden": 256,
    "temperature": 1.0,
    "num_denoise_steps": None,
    "noise_level": 0.5,
    "execute_steps": None,
    "chunk_size": 8,
    "action_distribution": "laplace",
    "scale_head": "state_independent",
    "init_log_scale": -2.0,
    "log_scale_bounds": [-5.0, 0.5],
    "action_head_file": None,
    "use_state": False,
}


def _own_keys(family: str) -> set[str]:
    return {f.name for f in dataclasses.fields(families.FAMILIES[family].config)}


# ---------------------------------------------------------------------------------------------------------------
# the policy section


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["policy.chunk_size=4"], "policy.chunk_size applies to policy.family=openvla_oft only"),
        (
            ["policy.family=pi0", "policy.n_bins=64"],
            "policy.n_bins applies to policy.family=action_tokens or openvla only",
        ),
        (
            ["policy.family=openvla", "policy.execute_steps=2"],
            "policy.execute_steps applies to policy.family=openvla_oft or pi0 only",
        ),
        (["policy.family=openvla_oft", "policy.use_state=true"], "policy.use_state applies to policy.family=pi0 only"),
        (["policy.family=openvla_oft", "policy.chunk_sise=4"], "did you mean 'policy.chunk_size'"),
        (["policy.family=open_vla"], "did you mean 'openvla'"),
    ],
)
def test_a_key_of_another_family_is_refused_with_the_family_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "family, own, expected_class",
    [
        ("action_tokens", {"n_bins": 64}, ActionTokenPolicyConfig),
        ("openvla", {"unnorm_key": "bridge_orig"}, OpenVLAPolicyConfig),
        (
            "openvla_oft",
            {"chunk_size": 4, "execute_steps": 2, "scale_head": "state_dependent"},
            OpenVLAOFTPolicyConfig,
        ),
        ("pi0", {"num_denoise_steps": 10, "execute_steps": 5, "use_state": True}, Pi0PolicyConfig),
    ],
)
def test_an_old_flat_recipe_with_every_policy_field_loads(tmp_path, family, own, expected_class):
    recipe = yaml.safe_load((RECIPES / "tiny_cpu.yaml").read_text())
    recipe["policy"] = {**OLD_POLICY_SECTION, "family": family, **own}
    recipe["lora"]["adapt_output_layer"] = family != "openvla_oft"  # OFT computes no logits
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    cfg = load_config(tmp_path / "recipe.yaml")
    assert type(cfg.policy) is expected_class
    assert {k: getattr(cfg.policy, k) for k in own} == own
    assert set(dataclasses.asdict(cfg.policy)) == _own_keys(family)  # the other families' keys are gone

    # a key of another family at a value other than its default is a mistake, not a leftover
    recipe["policy"]["noise_level" if family != "pi0" else "chunk_size"] = 0.25 if family != "pi0" else 4
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(ConfigError, match="applies to policy.family="):
        load_config(tmp_path / "recipe.yaml")


@pytest.mark.parametrize(
    "overrides",
    [
        ["policy.n_bins=32"],
        ["policy.family=openvla", "policy.unnorm_key=bridge_orig"],
        ["policy.family=openvla_oft", "policy.chunk_size=4", "policy.log_scale_bounds=[-3, 0]"],
        ["policy.family=pi0", "policy.noise_level=0.3", "policy.prompt_template='{instruction}'"],
    ],
)
def test_dump_yaml_writes_only_the_familys_keys_and_reloads_to_an_equal_config(tmp_path, overrides):
    cfg = load_config(None, overrides)
    text = dump_yaml(cfg)
    assert set(yaml.safe_load(text)["policy"]) == _own_keys(cfg.policy.family)
    (tmp_path / "recipe.yaml").write_text(text)
    again = load_config(tmp_path / "recipe.yaml")
    assert again == cfg and type(again.policy) is type(cfg.policy)


def test_switching_the_family_by_override_drops_the_recipes_keys_of_the_old_family(caplog):
    """tiny_cpu.yaml sets n_bins: 64 for its action-token base; an override to another family cannot delete that
    key, so the recipe's keys of the replaced family are dropped (and said); an override's own key is checked."""
    with caplog.at_level("WARNING", logger="rvla_peft.policies.families"):
        cfg = load_config(RECIPES / "tiny_cpu.yaml", ["policy.family=openvla_oft", *NO_LOGITS])
    assert type(cfg.policy) is OpenVLAOFTPolicyConfig
    assert "policy.n_bins=64 from the recipe does not apply to policy.family=openvla_oft" in caplog.text
    with pytest.raises(ConfigError, match="policy.n_bins applies to policy.family=action_tokens or openvla only"):
        load_config(RECIPES / "tiny_cpu.yaml", ["policy.family=openvla_oft", "policy.n_bins=32", *NO_LOGITS])
    # the same family: nothing dropped
    assert load_config(RECIPES / "tiny_cpu.yaml", ["policy.family=openvla"]).policy.n_bins == 64


def test_family_config_rebuilds_a_config_whose_family_changed_after_parsing():
    cfg = load_config(None, ["policy.n_bins=64"])
    cfg.policy.family = "openvla"
    rebuilt = families.family_config(cfg.policy)
    assert type(rebuilt) is OpenVLAPolicyConfig and rebuilt.n_bins == 64 and rebuilt.unnorm_key is None
    cfg.policy.family = "pi0"
    with pytest.raises(ConfigError, match="policy.n_bins applies to"):
        cfg.validate()
    # a plain PolicyConfig is its family's config with the defaults
    plain = families.family_config(PolicyConfig(family="openvla_oft", action_dim=6))
    assert plain == OpenVLAOFTPolicyConfig(action_dim=6)
    TrainConfig(policy=PolicyConfig()).validate()


def test_family_checks_live_in_the_familys_config():
    with pytest.raises(ConfigError, match="policy.n_bins: must be >= 2"):
        load_config(None, ["policy.n_bins=1"])
    with pytest.raises(ConfigError, match="policy.noise_level: must be > 0"):
        load_config(None, ["policy.family=pi0", "policy.noise_level=0"])
    with pytest.raises(ConfigError, match="policy.execute_steps: must be <= policy.chunk_size=4"):
        load_config(None, ["policy.family=openvla_oft", "policy.chunk_size=4", "policy.execute_steps=5"])
    with pytest.raises(ConfigError, match="policy.prompt_template: must contain"):
        load_config(None, ["policy.family=pi0", "policy.prompt_template=go"])
    # pi0 may execute more steps than OFT's default chunk: its chunk is the model's
    assert load_config(None, ["policy.family=pi0", "policy.execute_steps=20"]).policy.execute_steps == 20


def test_help_config_shows_every_familys_keys_with_the_family_named():
    text = help_text(TrainConfig)
    assert "policy.n_bins = 256  [policy.family=action_tokens or openvla only]" in text
    assert "policy.chunk_size = 8  [policy.family=openvla_oft only]" in text
    assert "policy.execute_steps = None  [policy.family=openvla_oft or pi0 only]" in text
    assert "policy.use_state = False  [policy.family=pi0 only]" in text
    for family in families.FAMILIES:
        for key in _own_keys(family):
            assert text.count(f"  policy.{key} = ") == 1, key


# ---------------------------------------------------------------------------------------------------------------
# the catalogue, the registry and the folders


def test_the_catalogue_and_the_registry_agree():
    names = set(families.FAMILIES)
    assert names == {"action_tokens", "openvla", "openvla_oft", "pi0"}
    assert (
        names == set(families.POLICY_FAMILIES) == set(families.LORA_DEFAULTS) == set(families.POLICY_VARIANTS.classes)
    )
    assert registry.LORA_DEFAULTS is families.LORA_DEFAULTS
    for name, family in families.FAMILIES.items():
        policy_class = registry.policy_class(name)
        assert issubclass(policy_class, Policy) and isinstance(policy_class.memory_hooks, MemoryHooks)
        assert policy_class.__module__ == f"rvla_peft.policies.{name}.modeling"
        assert family.config.__module__ == f"rvla_peft.policies.{name}.configuration"
        assert family.config().family == name and issubclass(family.config, PolicyConfig)
        lora = registry.resolve_lora(name, LoraSettings())
        assert {k: getattr(lora, k) for k in family.lora_defaults} == family.lora_defaults
    # OpenVLA-OFT reads OpenVLA checkpoints without being an action-token policy
    oft, tokens = registry.policy_class("openvla_oft"), registry.policy_class("action_tokens")
    assert not issubclass(oft, tokens) and issubclass(registry.policy_class("openvla"), tokens)
    # saving and the visual-embeddings hook are written once; OFT adds its heads file
    for name in names:
        assert registry.policy_class(name).capture_visual_embeddings is Policy.capture_visual_embeddings
        assert (registry.policy_class(name).save_pretrained is Policy.save_pretrained) == (name != "openvla_oft")


def test_the_catalogue_and_the_family_configurations_import_nothing_heavy():
    light = [PACKAGE / "policies" / "families.py", PACKAGE / "config" / "policy.py", PACKAGE / "config" / "parsing.py"]
    light += sorted((PACKAGE / "policies").glob("*/configuration.py"))
    assert len(light) == 7
    for path in light:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                top = name.split(".")[0]
                assert top not in ("torch", "transformers", "peft", "numpy", "PIL"), f"{path.name} imports {name}"
                assert name != "rvla_peft.config.schema", f"{path.name} imports the schema above it"


# ---------------------------------------------------------------------------------------------------------------
# one home for the shared maths


def test_one_unnormalisation_for_every_family():
    low, high = torch.tensor([0.0, -2.0, -1.0]), torch.tensor([2.0, 2.0, 3.0])
    a = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.0, 0.5, -0.5]])
    expected = torch.tensor([[0.0, -2.0, -1.0], [2.0, 2.0, 3.0], [1.0, 1.0, 0.0]])
    assert torch.equal(unnormalize_actions(a, low, high), expected)
    assert unnormalize_actions(a, None, None) is a  # no statistics: the identity, bit for bit
    assert torch.equal(unnormalize_actions(a, low, None), 0.5 * (a + 1) * (1 - low) + low)  # high defaults to 1
    tokenizer = ActionTokenizer(512, 256, low.tolist(), high.tolist(), action_dim=3)
    assert torch.equal(tokenizer.unnormalize(a), expected)
    for name in ("openvla_oft", "pi0"):
        module = __import__(f"rvla_peft.policies.{name}.modeling", fromlist=["unnormalize_actions"])
        assert module.unnormalize_actions is unnormalize_actions


def test_one_gaussian_with_one_convention_for_pi0_and_oft():
    g = torch.Generator().manual_seed(0)
    x, mean, log_scale = torch.randn(3, 4, 7, generator=g), torch.randn(3, 4, 7, generator=g), torch.randn(3, 4, 7)
    normal, laplace = (
        torch.distributions.Normal(mean, log_scale.exp()),
        torch.distributions.Laplace(mean, log_scale.exp()),
    )
    torch.testing.assert_close(distributions.gaussian_log_prob(x, mean, log_scale), normal.log_prob(x))
    torch.testing.assert_close(distributions.gaussian_entropy(log_scale), normal.entropy())
    torch.testing.assert_close(distributions.action_log_prob("laplace", x, mean, log_scale), laplace.log_prob(x))
    torch.testing.assert_close(distributions.action_entropy("laplace", log_scale), laplace.entropy())
    # by hand: log N(1; 0, e^2) = -1 / (2 e^2) - 1 - log(2 pi) / 2
    value = distributions.gaussian_log_prob(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0))
    assert value.item() == pytest.approx(-0.5 / math.e**2 - 1 - 0.5 * math.log(2 * math.pi), abs=1e-6)
    from rvla_peft.policies.pi0 import modeling as pi0

    assert pi0.gaussian_log_prob is distributions.gaussian_log_prob
    assert pi0.gaussian_entropy is distributions.gaussian_entropy


# ---------------------------------------------------------------------------------------------------------------
# memory hooks


def test_oft_memory_hooks_count_the_heads_build_policy_creates(tmp_path):
    from rvla_peft.memory import estimate_training_memory

    cfg = load_config(
        RECIPES / "tiny_cpu.yaml",
        [
            "model.name_or_path=builtin:tiny-openvla",
            "policy.family=openvla_oft",
            "policy.chunk_size=4",
            "policy.scale_head=state_dependent",
            *NO_LOGITS,
            f"output_dir={tmp_path}",
        ],
    )
    policy = registry.build_policy(cfg)
    est = estimate_training_memory(cfg)
    heads = [policy.value_head, policy.action_head, policy.scale_head]
    assert est.head_params == sum(p.numel() for head in heads for p in head.parameters())
    assert est.lora_params + est.head_params == sum(p.numel() for p in policy.trainable_parameters())
    hooks = registry.policy_class("openvla_oft").memory_hooks
    assert hooks.decoder_extra_tokens(cfg.policy) == 4 * 7 + 1 and not hooks.autoregressive
