import subprocess
import sys

import pytest
from conftest import RECIPES

from rvla_peft.config import ConfigError, TrainConfig, load_config


def test_defaults_and_overrides_with_yaml_types():
    cfg = load_config(
        RECIPES / "tiny_cpu.yaml", ["ppo.learning_rate=3e-5", "env.num_envs=4", "lora.target_modules=[q_proj,v_proj]"]
    )
    assert isinstance(cfg, TrainConfig)
    assert cfg.ppo.learning_rate == 3e-5 and cfg.env.num_envs == 4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.perturb.train[0].name == "pixel_noise"


@pytest.mark.parametrize(
    "override, message",
    [
        ("ppo.learnig_rate=1e-4", "did you mean 'ppo.learning_rate'"),
        ("evn.task=PickCube-v1", "did you mean 'env'"),
        ("env.num_envs=two", "env.num_envs: expected an integer"),
        ("env.num_envs=0", "env.num_envs: must be >= 1"),
        ("ppo.gamma=1.5", "ppo.gamma: must be in (0, 1]"),
        ("env.sim_backend=physx-cuda", "did you mean 'physx_cuda'"),
        ("regularizers.jacobian.form=hutch", "did you mean 'hutchinson'"),
        ("regularizers.jacobian.fraction=0", "regularizers.jacobian.fraction: must be in (0, 1]"),
        ("ppo.num_minibatches=1000", "ppo.num_minibatches: must be in [1, num_steps * env.num_envs"),
        ("policy.action_low=[0,0]", "policy.action_low: needs 7 values"),
        ("policy.family=diffusion", "policy.family: unknown family"),
        ("perturb.train=[{name: pixel_nois, severity: 0.5}]", "pixel_noise"),
        ("perturb.train=[{name: pixel_noise, severity: 2}]", "severity"),
        ("lora.r", "must look like key=value"),
        ("update_threads=0", "update_threads: must be >= 1"),
        ("report_to=[tensorbord]", "unknown tracker 'tensorbord'; use a list of ('tensorboard', 'wandb', 'swanlab')"),
        ("report_to=[wandb,wandb]", "report_to: names a tracker twice"),
        ("video_every=-1", "video_every: must be >= 0"),
    ],
)
def test_bad_input_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(RECIPES / "tiny_cpu.yaml", [override])
    assert message in str(err.value)


def test_trackers_are_accelerates_and_a_missing_one_is_named_before_any_work(tmp_path):
    """report_to takes trackers of Accelerate's tracker layer; one whose package is not installed (swanlab here) is a
    one-line error with the install command, raised before the trainer builds anything (Accelerate would drop it)."""
    import importlib.util

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from rvla_peft.config.schema import TRACKERS
    from rvla_peft.tracking import TRACKER_PACKAGES, check_reporting

    assert set(TRACKERS) <= set(LOGGER_TYPE_TO_CLASS) and set(TRACKER_PACKAGES) == set(TRACKERS)
    if importlib.util.find_spec("swanlab") is not None:
        pytest.skip("swanlab is installed")
    cfg = load_config(RECIPES / "tiny_cpu.yaml", ["report_to=[tensorboard,swanlab]", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^report_to: 'swanlab' needs the swanlab package: pip install 'swanlab'$"):
        check_reporting(cfg)
    from rvla_peft.trainer import RobustPPOTrainer

    with pytest.raises(ConfigError, match="swanlab"):
        RobustPPOTrainer(cfg)
    assert not (tmp_path / "run").exists()
    check_reporting(load_config(RECIPES / "tiny_cpu.yaml", ["report_to=[tensorboard,wandb]", "video_every=5"]))


def test_exact_invariance_needs_a_token_policy():
    with pytest.raises(ConfigError, match="regularizers.invariance.form: 'exact' needs a token policy"):
        oft = ["policy.family=openvla_oft", "lora.adapt_output_layer=false"]
        load_config(RECIPES / "tiny_cpu.yaml", [*oft, "regularizers.invariance.form=exact"])
    assert load_config(RECIPES / "tiny_cpu.yaml", ["regularizers.invariance.form=exact"]).regularizers.invariance


def test_missing_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "rvla_peft.train", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.integration
@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml") if not p.name.startswith("sft_")))
def test_every_recipe_passes_dry_run(recipe):
    result = _cli(str(RECIPES / recipe), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "ppo:" in result.stdout and "regularizers:" in result.stdout


def test_openvla_recipe_resolves_to_rl4vla_settings():
    cfg = load_config(RECIPES / "openvla_maniskill.yaml")
    assert cfg.model.name_or_path == "openvla/openvla-7b" and cfg.model.torch_dtype == "bfloat16"
    assert cfg.lora.r == 32 and cfg.lora.target_modules == "all-linear"
    assert cfg.env.num_envs == 64 and cfg.env.sim_backend == "physx_cuda"


@pytest.mark.integration
def test_cli_error_exits_2_before_loading_anything():
    result = _cli(str(RECIPES / "tiny_cpu.yaml"), "ppo.clip_coef=-1")
    assert result.returncode == 2
    assert "ppo.clip_coef: must be > 0" in result.stderr
    assert "Loading weights" not in result.stderr


@pytest.mark.integration
def test_cli_refuses_to_overwrite_a_finished_run(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"user's work")
    result = _cli(str(RECIPES / "tiny_cpu.yaml"), f"output_dir={tmp_path}")
    assert result.returncode == 2 and "overwrite_output_dir=true" in result.stderr
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == b"user's work"


@pytest.mark.integration
def test_dry_run_output_round_trips(tmp_path):
    result = _cli(str(RECIPES / "tiny_cpu.yaml"), "--dry-run", "seed=7")
    (tmp_path / "resolved.yaml").write_text(result.stdout)
    assert load_config(tmp_path / "resolved.yaml") == load_config(RECIPES / "tiny_cpu.yaml", ["seed=7"])
