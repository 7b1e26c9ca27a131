"""Merged export (``rvla_peft.exporting``, ``python -m rvla_peft.export``) for every policy family: an adapter with a
non-zero LoRA is merged into its base, the folder loads with plain transformers (no peft) and as a policy whose
deterministic actions are the adapter policy's; the value head is dropped, OFT heads kept, quantized bases refused."""

import dataclasses
import json
import logging
import shutil

import pytest
import torch
from helpers import fixed_obs
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from rvla_peft.cli.export import main as export_cli
from rvla_peft.config import dump_yaml, load_config
from rvla_peft.exporting import ExportError, export_merged
from rvla_peft.models.openvla.published import OPENVLA_7B_CONFIG
from rvla_peft.models.tiny import resolve_builtin
from rvla_peft.policies.registry import build_policy
from rvla_peft.utils.constants import (
    ACTION_HEADS_FILE,
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    CARD_FILE,
    POLICY_SETTINGS_FILE,
    RECIPE_FILE,
    VALUE_HEAD_FILE,
)

COMMON = ["report_to=[]", "lora.r=4", "lora.alpha=8", "lora.target_modules=null", "lora.adapt_output_layer=false"]
FAMILIES = {
    "action_tokens": ["model.name_or_path=builtin:tiny-llava", "lora.target_modules=all-linear"],
    # a copy of the tiny OpenVLA with openvla-7b's norm_stats, un-normalising through policy.unnorm_key (the fixture)
    "openvla": ["policy.family=openvla", "policy.unnorm_key=bridge_orig", "model.hub_id=tiny/openvla-norm-stats"],
    "openvla_oft": [
        "model.name_or_path=builtin:tiny-openvla",
        "policy.family=openvla_oft",
        "policy.chunk_size=4",
        "policy.execute_steps=2",
    ],
    "pi0": ["model.name_or_path=builtin:tiny-pi0", "policy.family=pi0", "policy.prompt_template='{instruction}'"],
}
TOKEN_FAMILIES = ("action_tokens", "openvla")
# Continuous actions (OFT's head, pi0's denoised chunk): merging computes (W + s B A) x instead of W x + s B (A x),
# another float32 rounding of every adapted layer, so the merged policy's actions move by float32 noise (~1e-7
# relative per layer); 1e-5 is far below the LoRA's own effect on the actions (asserted to exceed 1e-3).
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def family_cfg(family, tmp_path, *overrides):
    extra = []
    if family == "openvla":
        base = tmp_path / "tiny-openvla-norm-stats"
        if not base.exists():
            shutil.copytree(resolve_builtin("builtin:tiny-openvla"), base)
            config = json.loads((base / "config.json").read_text())
            config["norm_stats"] = OPENVLA_7B_CONFIG["norm_stats"]
            (base / "config.json").write_text(json.dumps(config))
        extra = [f"model.name_or_path={base}"]
    return load_config(None, [*COMMON, *FAMILIES[family], *extra, f"output_dir={tmp_path / 'run'}", *overrides])


def train_like_run(family, tmp_path, *overrides):
    """A run folder as training writes it (OUTPUT/recipe.yaml, OUTPUT/adapter/), with a LoRA that is not zero; returns
    the run folder and the in-memory policy it was saved from."""
    cfg = family_cfg(family, tmp_path, *overrides)
    torch.manual_seed(0)
    policy = build_policy(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.peft_model.named_parameters():
            if "lora_B" in name:  # zero-initialised: the adapter would be the identity
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for p in policy.value_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    run = tmp_path / "run"
    policy.save_pretrained(run / ADAPTER_DIR, base_model_id=cfg.model.hub_id or cfg.model.name_or_path)
    (run / RECIPE_FILE).write_text(dump_yaml(cfg))
    return run, policy


def assert_same_actions(family, expected, got):
    if family in TOKEN_FAMILIES:  # argmax tokens: identical, and so are the un-normalised actions they decode to
        assert torch.equal(expected.action, got.action)
        torch.testing.assert_close(got.env_action, expected.env_action, rtol=0, atol=0)
        torch.testing.assert_close(got.mean, expected.mean, rtol=0, atol=ATOL)
    else:
        torch.testing.assert_close(got.env_action, expected.env_action, rtol=0, atol=ATOL)
        torch.testing.assert_close(got.mean, expected.mean, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merged_export_acts_as_the_adapter_policy(family, tmp_path):
    import rvla_peft.models.openvla  # noqa: F401  registers model_type "openvla" with the Auto classes

    run, adapter_policy = train_like_run(family, tmp_path)
    obs = fixed_obs(batch=2, seed=3)
    expected = adapter_policy.act(obs, deterministic=True)
    with adapter_policy.peft_model.disable_adapter():  # the LoRA must matter, or the test proves nothing
        bare = adapter_policy.act(obs, deterministic=True)
    assert (bare.mean - expected.mean).abs().max() > 1e-3
    if family in TOKEN_FAMILIES:
        assert not torch.equal(bare.action, expected.action)

    out = export_merged(run, tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {RECIPE_FILE, POLICY_SETTINGS_FILE, CARD_FILE, "config.json", "model.safetensors"} <= names
    assert VALUE_HEAD_FILE not in names and ADAPTER_CONFIG not in names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # atomic_save's staging is gone
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "value_head" in k]

    # (a) plain transformers, as the card's snippet loads it: no peft anywhere, and a processor for every family
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert AutoProcessor.from_pretrained(out).tokenizer("pick")["input_ids"]
    assert not [n for n, _ in model.named_modules() if "lora" in n]
    assert not hasattr(model, "peft_config")
    merged_state = model.state_dict()
    base_state = adapter_policy.peft_model.get_base_model().state_dict()
    adapted = {k: f"{k.rsplit('.', 1)[0]}.base_layer.weight" for k in merged_state if k.endswith(".weight")}
    adapted = {k: b for k, b in adapted.items() if b in base_state}
    assert adapted  # adapted layers are in the merged model under their plain names, with W + s B A
    assert all(not torch.equal(merged_state[k], base_state[b]) for k, b in adapted.items())
    if family == "openvla":
        assert model.config.norm_stats == OPENVLA_7B_CONFIG["norm_stats"]

    # (b) an rvla_peft policy from the folder's own recipe (what `python -m rvla_peft.eval --base OUT` builds)
    cfg = load_config(out / RECIPE_FILE, [f"model.name_or_path={out}"])
    assert cfg.model.quantization == "none" and cfg.model.hub_id is None and cfg.policy.family == family
    assert json.loads((out / POLICY_SETTINGS_FILE).read_text()) == dataclasses.asdict(cfg.policy)
    torch.manual_seed(123)  # a fresh LoRA is zero whatever the seed; fresh OFT heads are not, the saved ones load
    merged_policy = build_policy(cfg).eval()
    assert_same_actions(family, expected, merged_policy.act(obs, deterministic=True))

    card = (out / CARD_FILE).read_text()
    assert "merge_and_unload" in card and "value head" in card and "not included" in card
    if family == "openvla_oft":
        assert (out / ACTION_HEADS_FILE).read_bytes() == (run / ADAPTER_DIR / ACTION_HEADS_FILE).read_bytes()
        assert cfg.policy.action_head_file == ACTION_HEADS_FILE
        # both trained heads come back through the recipe alone: the sampled actions' scale too
        for module in ("action_head", "scale_head"):
            trained, exported = getattr(adapter_policy, module), getattr(merged_policy, module)
            for a, b in zip(trained.parameters(), exported.parameters(), strict=True):
                assert torch.equal(a, b)
    else:
        assert ACTION_HEADS_FILE not in names


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_fresh_adapter_switched_off_acts_bit_for_bit_as_switched_on(family, tmp_path):
    """python -m rvla_peft.eval runs the base with its fresh adapter switched off (faster): the same bits."""
    import rvla_peft.models.openvla  # noqa: F401  registers model_type "openvla" with the Auto classes

    torch.manual_seed(0)
    policy = build_policy(family_cfg(family, tmp_path)).eval()
    obs = fixed_obs(batch=2, seed=3)
    for deterministic in (True, False):
        torch.manual_seed(1)
        on = policy.act(obs, deterministic=deterministic)
        with policy.peft_model.disable_adapter():
            torch.manual_seed(1)
            off = policy.act(obs, deterministic=deterministic)
        for field in ("action", "env_action", "log_prob", "mean"):
            assert torch.equal(getattr(on, field), getattr(off, field)), (deterministic, field)


def test_a_quantized_base_is_refused_before_any_model_loads_and_dequantized_on_request(tmp_path, caplog):
    run, adapter_policy = train_like_run("action_tokens", tmp_path)
    recipe = run / RECIPE_FILE
    cfg = load_config(recipe, ["model.quantization=4bit"])
    recipe.write_text(dump_yaml(cfg))  # as a QLoRA run records it; the LoRA weights are the same kind
    # A base that does not exist: if anything loaded a model before refusing, this would fail otherwise.
    with pytest.raises(ExportError, match=r"4bit.*--dequantize"):
        export_merged(run, tmp_path / "merged", base="tiny/does-not-exist")
    assert not (tmp_path / "merged").exists()

    with caplog.at_level(logging.WARNING, logger="rvla_peft.exporting"):
        out = export_merged(run, tmp_path / "merged", dequantize=True)
    assert "de-quantizing" in caplog.text
    assert "merged here into the unquantized base" in (out / CARD_FILE).read_text()
    merged = load_config(out / RECIPE_FILE, [f"model.name_or_path={out}"])
    assert merged.model.quantization == "none"
    obs = fixed_obs(batch=2, seed=3)
    # the base was never quantized here, so the de-quantized merge is the plain one
    assert torch.equal(
        build_policy(merged).act(obs, deterministic=True).action, adapter_policy.act(obs, deterministic=True).action
    )


def test_existing_output_and_missing_adapter_are_refused(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty.*--overwrite"):
        export_merged(tmp_path / "run", out)
    with pytest.raises(ExportError, match="does not exist"):
        export_merged(tmp_path / "no-run", tmp_path / "merged2")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(ExportError, match="no adapter"):
        export_merged(tmp_path / "empty-run", tmp_path / "merged2")
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_exports_and_reports_errors_in_one_line(tmp_path, capsys):
    run, _ = train_like_run("action_tokens", tmp_path)
    out = tmp_path / "merged"
    assert export_cli([str(run / ADAPTER_DIR), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    capsys.readouterr()

    def error(argv):
        assert export_cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "--overwrite" in error([str(run), "--out", str(out)])
    assert "does not exist" in error([str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    assert "would replace" in error([str(run), "--out", str(run), "--overwrite"])
    cfg = load_config(run / RECIPE_FILE, ["model.quantization=8bit"])
    (run / RECIPE_FILE).write_text(dump_yaml(cfg))
    assert "--dequantize" in error([str(run), "--out", str(tmp_path / "o3")])
    assert export_cli([str(run), "--out", str(out), "--overwrite", "--dequantize"]) == 0


def test_eval_takes_the_merged_folder_and_its_recipe_as_the_base(tmp_path, capsys):
    """`python -m rvla_peft.eval --base OUT` reads OUT's recipe (here: its task, not the default one) and evaluates
    the merged weights through a fresh, zero LoRA: the policy of test (b) above."""
    from rvla_peft import eval as rvla_eval

    run, _ = train_like_run("action_tokens", tmp_path, "env.task=PushCube-v1")
    out = export_merged(run, tmp_path / "merged")
    report_dir = tmp_path / "report"
    argv = ["--base", str(out), "--suite", "none", "--episodes", "2", "--out", str(report_dir)]
    assert rvla_eval.main([*argv, "env.max_episode_steps=3", "env.image_size=32", "env.num_envs=2"]) == 0
    capsys.readouterr()
    report = json.loads((report_dir / "report.json").read_text())
    assert report["task"] == "PushCube-v1"
    assert [(p["name"], p["base"]) for p in report["policies"]] == [("base", str(out))]
    assert [r["episodes"] for r in report["results"]] == [2]


def test_an_adapted_output_layer_tied_to_the_input_embeddings_is_untied_before_merging(tmp_path):
    """With tie_word_embeddings, merging LoRA into lm_head would change the input embeddings too (one tensor)."""
    base = tmp_path / "tied-llava"
    shutil.copytree(resolve_builtin("builtin:tiny-llava"), base)
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (base / "config.json").write_text(json.dumps(config))
    state = load_file(str(base / "model.safetensors"))
    del state["language_model.lm_head.weight"]  # a tied checkpoint stores the embeddings once
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    run, adapter_policy = train_like_run(
        "action_tokens", tmp_path, f"model.name_or_path={base}", "lora.adapt_output_layer=true"
    )
    model = adapter_policy.peft_model.get_base_model()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().base_layer.weight

    out = export_merged(run, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert torch.equal(merged.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert not torch.equal(merged.get_output_embeddings().weight, model.get_input_embeddings().weight)
    obs = fixed_obs(batch=2, seed=3)
    policy = build_policy(load_config(out / RECIPE_FILE, [f"model.name_or_path={out}"])).eval()
    assert_same_actions(
        "action_tokens", adapter_policy.act(obs, deterministic=True), policy.act(obs, deterministic=True)
    )
