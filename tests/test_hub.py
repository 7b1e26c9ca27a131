"""Sharing adapters: model card, one-commit push and loading back, against a real local Hub (tests/hub_server.py).

The server speaks the Hub's HTTP API, so huggingface_hub's own create_repo / create_commit / snapshot_download and
peft's PeftModel.from_pretrained run unchanged against it; see ``point_huggingface_hub_at`` for why the endpoint is
patched per test instead of set through HF_ENDPOINT.
"""

import hashlib
import json
import logging
import secrets
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import TINY_RANDOM
from helpers import fixed_obs
from hub_server import HubServer, point_huggingface_hub_at, validate_card_metadata

from rvla_peft import hub as rhub
from rvla_peft.cli import hub as hub_cli
from rvla_peft.config import ModelConfig, dump_yaml, load_config
from rvla_peft.hub import push as hub_push
from rvla_peft.models.tiny import resolve_builtin
from rvla_peft.policies.registry import build_policy, load_base, load_policy

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TOKEN = "hf_alice_" + secrets.token_hex(16)  # unique: any occurrence in a file or a log is a leak
BOB_TOKEN = "hf_bob_" + secrets.token_hex(16)
BASE_HUB_ID = "rvla-test/tiny-llava"
PUSHED = {
    ".gitattributes",
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "value_head.safetensors",
    "recipe.yaml",
    "report.json",
    "report.md",
    "robustness.png",
    "training_curve.png",
}


def sample_report(adapter: str) -> dict:
    """A report.json as ``python -m rvla_peft.eval`` writes it (schema_version 1): base vs one adapter."""
    grid = [("clean", "clean", 0.0), ("pixel_noise@0.5", "pixel_noise", 0.5)]
    grid += [(f"rotation@{s:g}", "rotation", s) for s in (0.5, 1.0)]
    success = {"base": [0.5, 0.3, 0.32, 0.16], "robust": [0.62, 0.54, 0.42, 0.3]}
    results = [
        {
            "policy": policy,
            "setting": name,
            "success_rate": rates[i],
            "ci95": [round(rates[i] - 0.13, 4), round(rates[i] + 0.13, 4)],
            "mean_return": 1.0 + rates[i],
            "episodes": 50,
            "successes": round(50 * rates[i]),
        }
        for policy, rates in success.items()
        for i, (name, _, _) in enumerate(grid)
    ]
    summary = {
        p: {
            "clean_success_rate": r[0],
            "mean_perturbed_success_rate": sum(r[1:]) / 3,
            "robustness_gap": r[0] - sum(r[1:]) / 3,
            "gap_by_perturbation": {"pixel_noise": r[0] - r[1], "rotation": r[0] - (r[2] + r[3]) / 2},
        }
        for p, r in success.items()
    }
    return {
        "schema_version": 1,
        "command": f"python -m rvla_peft.eval --base builtin:tiny-llava --adapter robust={adapter} --suite paper",
        "created": "2026-11-25T18:00:00Z",
        "versions": {"rvla_peft": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"},
        "task": "PickCube-v1",
        "suite": "paper",
        "episodes": 50,
        "seed": 0,
        "policies": [
            {"name": "base", "base": "builtin:tiny-llava", "adapter": None},
            {"name": "robust", "base": "builtin:tiny-llava", "adapter": adapter},
        ],
        "settings": [{"name": n, "perturbation": p, "severity": s} for n, p, s in grid],
        "results": results,
        "summary": summary,
        "paired": [
            {
                "policy": "robust",
                "baseline": "base",
                "setting": name,
                "difference": round(success["robust"][i] - success["base"][i], 4),
                "ci95": [-0.05, 0.25],
            }
            for i, (name, _, _) in enumerate(grid)
        ],
    }


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_no_token(*roots: Path, texts: tuple[str, ...] = ()) -> None:
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                assert TOKEN.encode() not in content and BOB_TOKEN.encode() not in content, f"token written to {path}"
    for text in texts:
        assert TOKEN not in text and BOB_TOKEN not in text, "token in logs or output"


# ------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run folder (adapter with non-zero LoRA, recipe, metrics, report) and the trained policy's outputs.

    The adapter records the base's local folder, as PEFT does by default; the recipe has model.hub_id.
    """
    root = tmp_path_factory.mktemp("hub_run")
    out = root / "run"
    cfg = load_config(
        RECIPES / "tiny_cpu.yaml",
        [
            *TINY_RANDOM,
            f"output_dir={out}",
            "report_to=[]",
            f"model.hub_id={BASE_HUB_ID}",
            "total_updates=3",
            "eval_episodes=2",
        ],
    )
    torch.manual_seed(0)
    policy = build_policy(cfg).eval()
    with torch.no_grad():  # a trained-looking adapter: with lora_B = 0 it would change nothing
        for name, param in policy.peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapter = out / "adapter"
    policy.save_pretrained(adapter, base_model_id=resolve_builtin(cfg.model.name_or_path))
    (adapter / "recipe.yaml").write_text(dump_yaml(cfg))
    (out / "recipe.yaml").write_text(dump_yaml(cfg))
    rows = [{"update": u, "rollout/return": 0.4 + 0.1 * u, "rollout/success_rate": 0.1 * u} for u in (1, 2, 3)]
    rows.append({"update": 3, "eval/clean/success_rate": 0.5, "eval/clean/return": 1.5})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report_dir = out / "report"
    report_dir.mkdir()
    (report_dir / "report.json").write_text(json.dumps(sample_report(str(adapter)), indent=1))
    (report_dir / "report.md").write_text("| setting | robust |\n|---|---|\n| clean | 62% |\n")
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(report_dir / "robustness.png")

    obs = fixed_obs(3)
    ids, mask = policy.encode_prompts(obs["instruction"])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=policy.observation_inputs(obs))
    with torch.no_grad():
        logits = policy.peft_model(**inputs).logits
        actions = policy.act(obs, deterministic=True).action
        evaluated = policy.evaluate(obs, actions)
    return SimpleNamespace(
        cfg=cfg, out=out, adapter=adapter, obs=obs, inputs=inputs, logits=logits, actions=actions, out_eval=evaluated
    )


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A live local Hub with users alice and bob; huggingface_hub points at it, logged in as alice (HF_TOKEN)."""
    server = HubServer(tmp_path / "hub_store", users={TOKEN: "alice", BOB_TOKEN: "bob"}).start()
    monkeypatch.setattr(hub_push, "BACKOFF_S", 0.01)  # the retries themselves are real
    point_huggingface_hub_at(server.url, tmp_path / "hf_home", monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.stop()


def copy_run(run, tmp_path: Path) -> Path:
    shutil.copytree(run.out, tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------------------------------
# push, then load back


def test_push_is_one_commit_and_loads_back_bit_exactly(run, hub, tmp_path, caplog, capfd, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub then logs every request as a curl command
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    before = tree_digest(run.out)
    info = rhub.push_adapter(run.out, "robust-tiny")  # no namespace: under the logged-in user

    assert info.commit_url.startswith(f"{hub.url}/alice/robust-tiny/commit/")
    history = hub.history("alice/robust-tiny")
    assert len(history) == 2, "everything must arrive in ONE commit after the repo's initial one"
    files = hub.files("alice/robust-tiny")
    assert set(files) == PUSHED
    assert not [f for f in files if f.endswith(".bin")]
    pushed_config = json.loads(files["adapter_config.json"])
    assert pushed_config["base_model_name_or_path"] == BASE_HUB_ID, "a local base path must never be pushed"
    assert files["adapter_model.safetensors"] == (run.adapter / "adapter_model.safetensors").read_bytes()
    assert files["report.json"] == (run.out / "report" / "report.json").read_bytes()
    assert files["training_curve.png"].startswith(b"\x89PNG")
    assert tree_digest(run.out) == before, "a push only reads the run folder"

    # PEFT alone, from the repo id, on a fresh base: the trained logits, bit for bit.
    from peft import PeftModel

    base, _ = load_base(run.cfg.model)
    reloaded = PeftModel.from_pretrained(base, "alice/robust-tiny").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**run.inputs).logits, run.logits)

    # The whole policy (recipe + LoRA + value head) from the repo id.
    policy = load_policy("builtin:tiny-llava", "alice/robust-tiny").eval()
    with torch.no_grad():
        again = policy.evaluate(run.obs, run.actions)
    assert torch.equal(again.log_prob, run.out_eval.log_prob) and torch.equal(again.value, run.out_eval.value)

    captured = capfd.readouterr()
    assert "Send: curl" in caplog.text and "<TOKEN>" in caplog.text, "the debug logs were not captured"
    assert_no_token(run.out, hub.root, tmp_path / "hf_home", texts=(caplog.text, captured.out, captured.err))


def test_card_parses_validates_and_holds_the_report_numbers(run, hub):
    from huggingface_hub import ModelCard

    rhub.push_adapter(run.out, "alice/robust-tiny")
    card = ModelCard.load("alice/robust-tiny")
    card.validate()  # the server's /api/validate-yaml
    data = card.data
    assert data.library_name == "peft" and data.pipeline_tag == "robotics"
    assert data.base_model == BASE_HUB_ID
    assert {"lora", "robustness", "rvla-peft", "PickCube-v1"} <= set(data.tags)
    report = sample_report(str(run.adapter))
    expected = {r["setting"]: r["success_rate"] for r in report["results"] if r["policy"] == "robust"}
    got = {r.dataset_config: r.metric_value for r in data.eval_results}
    assert got == expected  # exactly: the card copies report.json's numbers
    assert {r.metric_type for r in data.eval_results} == {"success_rate"}
    assert data.model_name == "robust-tiny"

    from rvla_peft.perturbations import PERTURBATIONS

    untried = sorted(set(PERTURBATIONS) - {"pixel_noise", "rotation"})  # registered, absent from the report
    assert "action_noise" in untried
    text = card.text
    for needle in (
        "| `rotation@0.5` | 42% [29, 55] |",  # the robustness table, with the paired difference beside it
        "+10 pts",
        # a report that does not record its interval methods is an older one: its paired interval was normal
        "Intervals: success, Wilson score interval over the setting's episodes; difference, normal approximation",
        "![success rate under each perturbation and severity](robustness.png)",
        "![episode return and success rate per PPO update](training_curve.png)",
        "```yaml\n" + (run.out / "recipe.yaml").read_text().rstrip(),
        "python -m rvla_peft.train robust-tiny/recipe.yaml",
        report["command"],
        'PeftModel.from_pretrained(base, "alice/robust-tiny")',
        'load_policy("rvla-test/tiny-llava", "alice/robust-tiny")',
        "Perturbations not evaluated, so robustness to them is unknown: " + ", ".join(f"`{p}`" for p in untried),
        "simulation only",
        "smoothness penalty: beta = 0.1 (old_policy); invariance penalty: off.",
    ):
        assert needle in text, needle
    assert validate_card_metadata("---\nbase_model: builtin:tiny-llava\n---\n"), "the server validator must bite"


def test_push_carries_the_rollout_gifs_and_the_card_shows_them(run, hub, tmp_path):
    """A report with rollout clips (eval --video K): the push uploads the GIFs (not the MP4s) and the card embeds
    each one, under its setting."""
    import numpy as np
    from huggingface_hub import ModelCard

    from rvla_peft.utils.video import EpisodeFrames, side_by_side, write_gif, write_mp4

    out = copy_run(run, tmp_path)
    report_dir = out / "report"
    report = json.loads((report_dir / "report.json").read_text())
    report["videos"] = []
    for setting, stem in [("clean", "clean"), ("rotation@0.5", "rotation_0.5")]:
        frames = np.full((3, 16, 16, 3), 100, dtype=np.uint8)
        clip = side_by_side([EpisodeFrames("base", frames, False), EpisodeFrames("robust", frames, True)], setting)
        write_gif(clip, report_dir / "videos" / f"{stem}.gif")
        write_mp4(clip, report_dir / "videos" / f"{stem}.mp4")
        report["videos"].append({"setting": setting, "mp4": f"videos/{stem}.mp4", "gif": f"videos/{stem}.gif",
                                 "seeds": [0], "successes": {"base": [0], "robust": [1]}})  # fmt: skip
    (report_dir / "report.json").write_text(json.dumps(report))

    rhub.push_adapter(out, "alice/robust-clips")
    files = hub.files("alice/robust-clips")
    assert set(files) == PUSHED | {"videos/clean.gif", "videos/rotation_0.5.gif"}  # no MP4
    assert files["videos/clean.gif"] == (report_dir / "videos" / "clean.gif").read_bytes()
    text = ModelCard.load("alice/robust-clips").text
    assert "Rollouts: the first 1 episode of each setting, `robust` and the other evaluated policies" in text
    assert "**clean**\n\n![robust on clean](videos/clean.gif)" in text
    assert "**rotation@0.5**\n\n![robust on rotation@0.5](videos/rotation_0.5.gif)" in text


def test_checkpoint_and_final_push_hooks(run, hub, tmp_path, caplog):
    """What RobustPPOTrainer.push_to_hub runs (hub.push_checkpoints / hub.push_to_hub), without a training run."""
    from rvla_peft.trainer import RobustPPOTrainer

    out = copy_run(run, tmp_path)
    checkpoint = out / "checkpoints" / "update-000001"
    checkpoint.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"):
        shutil.copy(out / "adapter" / name, checkpoint / name)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"update": 1}))
    cfg = load_config(
        out / "recipe.yaml",
        [f"output_dir={out}", "save_every=1", "hub.push_to_hub=true", "hub.push_checkpoints=true",
         "hub.repo_id=alice/hooked"],
    )  # fmt: skip
    trainer = SimpleNamespace(
        cfg=cfg, accelerator=SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    )

    RobustPPOTrainer.push_to_hub(trainer, checkpoint, checkpoint=True)
    files = hub.files("alice/hooked", "checkpoints")
    assert {"trainer_state.json", "README.md", "adapter_model.safetensors", "recipe.yaml"} <= set(files)
    assert "checkpoint at PPO update 1 of 3" in files["README.md"].decode()
    assert "report.json" not in files, "the report evaluated the final adapter, not this checkpoint"
    assert len(hub.history("alice/hooked", "main")) == 1, "checkpoints stay off main"

    RobustPPOTrainer.push_to_hub(trainer, out / "adapter")
    assert set(hub.files("alice/hooked")) == PUSHED

    cfg.hub.repo_id = "alice/fresh"  # unchanged files make no commit at all: fail on a new repo
    hub.fail("commit", 500)
    with caplog.at_level(logging.WARNING):
        assert rhub.push_training_output(cfg, checkpoint, checkpoint=True) is None  # warns, training goes on
    assert "checkpoint push failed; training goes on" in caplog.text
    hub.fail("commit", 403)
    with pytest.raises(rhub.HubError, match=f"Push it again with: python -m rvla_peft.hub push {out}"):
        RobustPPOTrainer.push_to_hub(trainer, out / "adapter")


def test_training_pushes_at_checkpoints_and_at_the_end(tiny_cfg, hub, tmp_path):
    """A real 2-update run with hub.push_to_hub and hub.push_checkpoints (about 20-40 s on 2 busy cores)."""
    from rvla_peft.trainer import RobustPPOTrainer

    tiny_cfg.total_updates, tiny_cfg.save_every = 2, 1
    tiny_cfg.env.max_episode_steps = tiny_cfg.ppo.num_steps  # episodes restart at checkpoints: let them end first
    tiny_cfg.hub.push_to_hub, tiny_cfg.hub.push_checkpoints, tiny_cfg.hub.repo_id = True, True, "alice/trained"
    RobustPPOTrainer(tiny_cfg).train()
    files = hub.files("alice/trained")
    assert {"adapter_model.safetensors", "value_head.safetensors", "training_curve.png", "recipe.yaml"} <= set(files)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "builtin:tiny-llava"
    card = files["README.md"].decode()
    assert "No robustness report was pushed" in card and "base_model:" not in card  # a builtin is no Hub model
    assert json.loads(hub.files("alice/trained", "checkpoints")["trainer_state.json"])["update"] == 1
    assert_no_token(Path(tiny_cfg.output_dir), hub.root, tmp_path / "hf_home")


# ------------------------------------------------------------------------------------------------------------------
# failures: clear errors, nothing changed locally


def test_local_base_path_is_refused_without_hub_id(run, hub, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    cfg = load_config(out / "adapter" / "recipe.yaml", ["model.hub_id=null"])
    (out / "adapter" / "recipe.yaml").write_text(dump_yaml(cfg))
    before = tree_digest(out)
    with pytest.raises(rhub.HubError, match=r"local path .* set model.hub_id in the recipe"):
        rhub.push_adapter(out, "alice/nope")
    assert hub.calls("create") == 0 and tree_digest(out) == before

    argv = ["push", str(out), "--repo-id", "alice/nope", "--base-id", BASE_HUB_ID, "--private"]
    assert hub_cli.main(argv) == 0  # the command line; --base-id names the base instead
    assert json.loads(hub.files("alice/nope")["adapter_config.json"])["base_model_name_or_path"] == BASE_HUB_ID
    assert hub.repos["alice/nope"]["private"] and f"{hub.url}/alice/nope/commit/" in capsys.readouterr().out
    assert tree_digest(out) == before


def test_server_errors_are_retried_then_reported_and_change_nothing(run, hub):
    before = tree_digest(run.out)
    hub.fail("commit", 500)
    with pytest.raises(rhub.HubError, match=r"after 4 attempts \(HTTP 500.*No commit was made"):
        rhub.push_adapter(run.out, "alice/flaky")
    assert hub.calls("commit") == 4
    assert len(hub.history("alice/flaky")) == 1, "no commit beyond the repo's initial one"
    assert tree_digest(run.out) == before

    hub.fail("commit", 503, times=1)  # one transient failure: the retry gets through
    rhub.push_adapter(run.out, "alice/flaky")
    assert set(hub.files("alice/flaky")) == PUSHED


def test_repo_of_another_owner_is_a_clear_403(run, hub):
    from huggingface_hub import HfApi

    HfApi(token=BOB_TOKEN).create_repo("bob/taken")
    before = tree_digest(run.out)
    for repo in ("bob/taken", "bob/not-yet"):  # exists (commit refused) / does not (create refused)
        with pytest.raises(rhub.HubError, match=r"alice may not write to bob/.*403.*--repo-id alice/"):
            rhub.push_adapter(run.out, repo)
    assert len(hub.history("bob/taken")) == 1 and "bob/not-yet" not in hub.repos
    assert tree_digest(run.out) == before


def test_not_logged_in_and_rejected_token(run, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(rhub.HubError, match=r"not logged in .*hf auth login.*HF_TOKEN"):
        rhub.push_adapter(run.out, "alice/x")
    assert hub.requests == []
    monkeypatch.setenv("HF_TOKEN", "hf_revoked_" + secrets.token_hex(8))
    with pytest.raises(rhub.HubError, match=r"rejected your token \(401\)"):
        rhub.push_adapter(run.out, "alice/x")


def test_unreachable_hub_is_retried_then_a_clear_error(run, hub):
    hub.stop()  # the port closes: connection refused
    with pytest.raises(rhub.HubError, match=r"could not reach the Hub at http://127\.0\.0\.1:\d+ after 4 attempts"):
        rhub.push_adapter(run.out, "alice/x")


# ------------------------------------------------------------------------------------------------------------------
# loading: base checks, local folders; the card command


def test_load_policy_refuses_an_adapter_of_another_base(run):
    # The local adapter records the tiny model's cache folder (PEFT's default), not the hub id.
    with pytest.raises(rhub.BaseMismatchError, match=r"trained on base .*tiny-llava.*allow_base_mismatch=True"):
        load_policy("someone/other-vla", run.adapter)
    policy = load_policy(ModelConfig(name_or_path="builtin:tiny-llava"), run.adapter, allow_base_mismatch=True)
    with torch.no_grad():
        again = policy.eval().evaluate(run.obs, run.actions)
    assert torch.equal(again.log_prob, run.out_eval.log_prob)
    with pytest.raises(rhub.HubError, match="neither a folder nor a Hub repo id"):
        load_policy(None, "outputs/no/such/adapter")


def test_card_command_stages_the_upload_locally(run, tmp_path, capsys):
    from huggingface_hub import ModelCard

    elsewhere = tmp_path / "eval_out"
    shutil.copytree(run.out / "report", elsewhere)
    report = json.loads((elsewhere / "report.json").read_text())
    report["policies"].append({"name": "other", "base": "builtin:tiny-llava", "adapter": "elsewhere/adapter"})
    (elsewhere / "report.json").write_text(json.dumps(report))
    before = tree_digest(run.out)
    out = tmp_path / "card"
    argv = ["card", str(run.out), "--out", str(out), "--repo-id", "alice/robust-tiny", "--report", str(elsewhere)]
    assert hub_cli.main(argv) == 0  # two adapters in the report: the one whose path is this adapter is chosen
    assert set(p.name for p in out.iterdir()) == PUSHED - {".gitattributes"}
    assert tree_digest(run.out) == before
    card = ModelCard.load(out / "README.md")
    assert {r.metric_value for r in card.data.eval_results} == {0.62, 0.54, 0.42, 0.3}
    assert "wrote" in capsys.readouterr().out

    report["policies"][1]["adapter"] = "moved/adapter"  # now neither adapter is this one: ask for --policy
    (elsewhere / "report.json").write_text(json.dumps(report))
    assert hub_cli.main(argv) == 1
    assert "choose the one being pushed with --policy NAME" in capsys.readouterr().err
    assert hub_cli.main([*argv, "--policy", "robust"]) == 0


def test_base_ids_are_hub_ids_never_local_paths(tmp_path):
    model = ModelConfig(hub_id=BASE_HUB_ID)
    assert rhub.resolve_base_id(str(tmp_path), model) == BASE_HUB_ID  # a local folder is replaced
    assert rhub.resolve_base_id("./models/vla", model) == BASE_HUB_ID
    assert rhub.resolve_base_id("openvla/openvla-7b", model) == "openvla/openvla-7b"
    assert rhub.resolve_base_id("builtin:tiny-llava", ModelConfig()) == "builtin:tiny-llava"
    with pytest.raises(rhub.HubError, match="set model.hub_id"):
        rhub.resolve_base_id(str(tmp_path), ModelConfig())
    assert rhub.is_hub_id("openvla/openvla-7b") and rhub.is_hub_id("gpt2")
    assert not any(map(rhub.is_hub_id, ["builtin:tiny-llava", str(tmp_path), "a/b/c", "~/m", None]))


def test_recipe_hub_keys_are_checked():
    from rvla_peft.config import ConfigError

    cfg = load_config(RECIPES / "tiny_cpu.yaml", ["hub.push_to_hub=true", "hub.repo_id=alice/robust"])
    assert cfg.hub.repo_id == "alice/robust" and yaml.safe_load(dump_yaml(cfg))["hub"]["push_to_hub"] is True
    with pytest.raises(ConfigError, match="hub.repo_id: is required"):
        load_config(RECIPES / "tiny_cpu.yaml", ["hub.push_to_hub=true"])
    with pytest.raises(ConfigError, match="hub.push_checkpoints: needs save_every > 0"):
        load_config(RECIPES / "tiny_cpu.yaml", ["hub.push_checkpoints=true", "hub.repo_id=a/b"])


@pytest.mark.integration
def test_command_line_push_in_a_fresh_process(run, hub, tmp_path):
    """`python -m rvla_peft.hub push` in a new interpreter, configured only by HF_ENDPOINT / HF_HOME / HF_TOKEN."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "rvla_peft.hub", "push", str(run.out), "--repo-id", "alice/cli", "--revision", "v1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{hub.url}/alice/cli/commit/" in done.stdout and "Pushing 9 files" in done.stderr
    assert set(hub.files("alice/cli", "v1")) == PUSHED and len(hub.history("alice/cli")) == 1  # main untouched
    assert 'revision="v1"' in hub.files("alice/cli", "v1")["README.md"].decode()
    assert_no_token(texts=(done.stdout, done.stderr))

    done = subprocess.run([*argv[:-4], "--repo-id", "bob/cli"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "\nerror: alice may not write to bob/cli" in done.stderr


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["regularizers.jacobian.weight=0", "regularizers.smoothness.weight=0", "kl_to_base=0"],
         "PPO on the task's reward, with no penalty"),
        (["algorithm=rloo", "regularizers.jacobian.weight=0", "regularizers.smoothness.weight=0"],
         "RLOO on the task's reward, with a KL penalty that keeps it near the base model"),
        (["regularizers.smoothness.weight=0", "kl_to_base=0", "regularizers.invariance.weight=1",
          "regularizers.invariance.target=current"],
         "PPO on the task's reward, with a Jacobian penalty that makes the action insensitive to small image changes "
         "and an invariance penalty that pulls the action distribution on a perturbed frame towards its own on the "
         "clean one (the Jacobian and smoothness penalties are RobustVLA's, "
         "[arXiv 2511.01331](https://arxiv.org/abs/2511.01331))"),
    ],
)  # fmt: skip
def test_card_names_the_algorithm_and_only_the_penalties_that_were_on(overrides, expected):
    from rvla_peft.cards import training_method

    assert training_method(load_config("recipes/tiny_cpu.yaml", overrides)) == expected


def test_card_footnote_names_the_interval_methods_the_report_records():
    from rvla_peft.cards import interval_footnote
    from rvla_peft.evaluation import interval_methods

    assert interval_footnote({"intervals": interval_methods(100)}) == (
        "Intervals: success, Wilson score interval over the cell's 100 episodes; difference, Newcombe's score "
        "interval for paired proportions (method 10), over the 100 episode pairs."
    )
    assert (
        interval_footnote({}, paired=False) == "Intervals: success, Wilson score interval over the setting's episodes."
    )
