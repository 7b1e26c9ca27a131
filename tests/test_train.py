"""End to end on real ManiSkill envs and a real tiny VLA: train, save, reload with PeftModel.from_pretrained."""

import json
from pathlib import Path

import torch
from helpers import fixed_obs, read_wandb_history
from peft import PeftModel

from rvla_peft.policies.registry import build_policy, load_base
from rvla_peft.trainer import RobustPPOTrainer
from rvla_peft.utils.threads import torch_threads


def test_train_saves_an_adapter_that_reloads_bit_exactly(tiny_cfg):
    trainer = RobustPPOTrainer(tiny_cfg)
    metrics = trainer.train()
    for key in ("loss/ppo", "loss/value", "loss/jacobian", "loss/smooth", "ppo/approx_kl", "time/env_steps_per_s"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    out = Path(tiny_cfg.output_dir)
    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors", "recipe.yaml"} <= {
        p.name for p in adapter.iterdir()
    }
    assert not list(adapter.glob("*.bin")), "adapters are saved with safetensors only"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "builtin:tiny-llava"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == tiny_cfg.total_updates

    policy = trainer.policy.eval()
    lora_b = [p for n, p in policy.peft_model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "training did not move the adapter"

    # A freshly loaded base + PeftModel.from_pretrained gives the trained policy's logits, bit for bit.
    obs = fixed_obs(3)
    ids, mask = policy.encode_prompts(obs["instruction"])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=policy.observation_inputs(obs))
    base, _ = load_base(tiny_cfg.model)
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, policy.peft_model(**inputs).logits)

    # The full policy (adapter + value head) also round-trips.
    again = build_policy(tiny_cfg, adapter=adapter).eval()
    actions = policy.act(obs, deterministic=True).action
    with torch.no_grad():
        a, b = policy.evaluate(obs, actions), again.evaluate(obs, actions)
    assert torch.equal(a.log_prob, b.log_prob) and torch.equal(a.value, b.value)


def test_temporal_smoothness_and_grad_penalty_forms_train(tiny_cfg):
    tiny_cfg.regularizers.smoothness.form = "temporal"
    tiny_cfg.regularizers.smoothness.fraction = 1.0
    tiny_cfg.regularizers.jacobian.form = "grad_penalty"
    trainer = RobustPPOTrainer(tiny_cfg)
    metrics = trainer.train()
    assert metrics["loss/smooth"] > 0 and metrics["loss/jacobian"] > 0


def test_regularisers_off_cost_nothing_and_log_nothing(tiny_cfg):
    tiny_cfg.regularizers.jacobian.weight = 0.0
    tiny_cfg.regularizers.smoothness.weight = 0.0
    metrics = RobustPPOTrainer(tiny_cfg).train()
    assert "loss/jacobian" not in metrics and "loss/smooth" not in metrics


def test_updates_run_on_update_threads_and_rollouts_on_torchs_count(tiny_cfg, monkeypatch):
    tiny_cfg.update_threads = 2
    trainer = RobustPPOTrainer(tiny_cfg)
    seen = []
    update, act = trainer.update, trainer.policy.act
    monkeypatch.setattr(trainer, "update", lambda r: (seen.append(("update", torch.get_num_threads())), update(r))[1])
    act_threads = lambda *a, **k: (seen.append(("act", torch.get_num_threads())), act(*a, **k))[1]  # noqa: E731
    monkeypatch.setattr(trainer.policy, "act", act_threads)
    with torch_threads(1):
        trainer.train()
        assert torch.get_num_threads() == 1
    # every rollout step on torch's count; the update (and the drift probe's acts beside it) on update_threads
    assert seen.count(("act", 1)) == tiny_cfg.ppo.num_steps * tiny_cfg.total_updates
    assert seen.count(("update", 2)) == tiny_cfg.total_updates and ("update", 1) not in seen


def test_bf16_autocast_checkpoints_eval_and_tensorboard(tiny_cfg):
    tiny_cfg.mixed_precision = "bf16"
    tiny_cfg.total_updates = 2
    tiny_cfg.save_every = 1
    tiny_cfg.eval_every = 1
    tiny_cfg.eval_episodes = 2
    tiny_cfg.report_to = ["tensorboard"]
    metrics = RobustPPOTrainer(tiny_cfg).train()
    out = Path(tiny_cfg.output_dir)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("loss/"))
    for key in ("eval/clean/success_rate", "eval/pixel_noise@0.5/success_rate", "eval/action_noise@0.67/return"):
        assert key in metrics, key
    checkpoint = out / "checkpoints" / "update-000001"
    assert {"adapter_model.safetensors", "value_head.safetensors", "optimizer.pt", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert json.loads((checkpoint / "trainer_state.json").read_text())["update"] == 1
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert not list(out.glob(".*.tmp")), "a staging folder was left behind"


def test_gradient_accumulation_matches_one_big_step(tiny_cfg):
    """Micro-batches of half the minibatch, accumulated, give the same optimizer step as the whole minibatch."""
    from rvla_peft.rollout import collect

    tiny_cfg.ppo.num_minibatches = 1
    tiny_cfg.regularizers.jacobian.weight = 0.0  # its subset size depends on the micro-batch size
    tiny_cfg.ppo.max_grad_norm = 1e6  # no clipping, and plain SGD below: both would hide a wrongly scaled gradient
    trainer = RobustPPOTrainer(tiny_cfg)
    trainer.policy.eval()
    rollout, _ = collect(trainer.policy, trainer.train_env, trainer.train_env.reset(seed=0), 4, 0.99)
    trainer.policy.train()
    start = {id(p): p.detach().clone() for p in trainer.params}
    results = []
    for steps in (1, 2):
        for p in trainer.params:
            p.data.copy_(start[id(p)])
        trainer.optimizer = trainer.accelerator.prepare(torch.optim.SGD(trainer.params, lr=0.1))
        trainer.sample_generator.manual_seed(0)
        trainer.cfg.ppo.gradient_accumulation_steps = steps
        trainer.update(rollout)
        results.append([p.detach().clone() for p in trainer.params])
    moved = sum((a - start[id(p)]).abs().sum().item() for a, p in zip(results[0], trainer.params, strict=True))
    assert moved > 0
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_wandb_offline_logs_the_keys_of_metrics_jsonl_and_tensorboard_and_rollout_clips(
    tiny_cfg, tmp_path, monkeypatch
):
    """report_to=[tensorboard, wandb] (offline): both trackers get exactly the metric names of metrics.jsonl, and
    video_every=1 writes each update's rollout clip, logged to wandb as a video and to TensorBoard as an image."""
    import imageio.v3 as iio
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rvla_peft.utils.video import frame_size

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny_cfg.total_updates = 2
    tiny_cfg.report_to = ["tensorboard", "wandb"]
    tiny_cfg.video_every = 1
    trainer = RobustPPOTrainer(tiny_cfg)
    trainer.train()
    import wandb

    wandb.teardown()  # the run finished; its service process may still hold the run file's last writes
    out = Path(tiny_cfg.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {k for row in rows for k in row} - {"update"}
    assert "loss/total" in logged and "rollout/step_reward" in logged

    (run_file,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb")
    history = read_wandb_history(run_file)
    assert [row["_step"] for row in history] == [1, 2]
    for row, jsonl in zip(history, rows, strict=True):  # per update, the same keys and values
        assert row["rollout/video"]["_type"] == "video-file" and row["rollout/video"]["path"].endswith(".gif")
        assert {k for k in row if not k.startswith("_")} - {"rollout/video"} == set(jsonl) - {"update"}
        assert all(row[k] == v for k, v in jsonl.items() if k != "update")
    assert {k for row in history for k in row if not k.startswith("_")} - {"rollout/video"} == logged

    events = EventAccumulator(str(out / "rvla_peft"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == logged
    assert events.Tags()["images"] == ["rollout/video"]

    panels = 2 if trainer.train_env.keep_clean else 1  # the clean frames beside the seen ones where kept
    for update in (1, 2):
        clip = iio.imread(out / "videos" / f"update-{update:06d}.gif")
        image = tiny_cfg.env.image_size
        assert clip.shape == (tiny_cfg.ppo.num_steps + 1, *frame_size(image, image, panels), 3)


def test_rollout_clips_show_env_0_of_a_ppo_rollout_and_the_first_episode_of_a_group_rollout():
    """The training clip reuses the rollout's frames: env 0's T+1 frames of a PPO rollout (the clean ones beside
    them where kept), the first kept episode of a group rollout; no outcome is drawn on a stretch of frames."""
    from rvla_peft.rollout import GroupRollout, Rollout
    from rvla_peft.tracking import rollout_clip
    from rvla_peft.utils.video import BAND, frame_size

    gen = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (5, 2, 64, 64, 3), generator=gen, dtype=torch.uint8)  # T=4 steps, 2 envs
    zeros = torch.zeros(4, 2)
    actions = zeros[..., None]
    ppo = Rollout(rgb, actions, zeros, zeros, zeros, zeros.bool(), actions, torch.zeros(2), ["a", "b"],
                  rgb_clean=rgb[:4].flip(-1))  # fmt: skip
    clip = rollout_clip(ppo, update=3)
    assert len(clip) == 5 and clip[0].shape == (*frame_size(64, 64, 2), 3)
    for t in range(5):  # seen frames in the right panel (2x upscaled), clean ones on the left (the last one held)
        assert (clip[t][BAND + 16 : BAND + 112 : 2, 128 + 16 : 128 + 112 : 2] == rgb[t, 0, 8:56, 8:56].numpy()).all()
        assert (clip[t][BAND + 16 : BAND + 112 : 2, 16:112:2] == rgb[min(t, 3), 0, 8:56, 8:56].flip(-1).numpy()).all()
    ppo.rgb_clean = None
    assert rollout_clip(ppo, update=3)[0].shape == (*frame_size(64, 64, 1), 3)

    flat = rgb.reshape(10, 64, 64, 3)
    episode = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    groups = GroupRollout(flat, torch.zeros(10, 1), torch.zeros(10), torch.zeros(10, 1), torch.zeros(10).long(),
                          episode, torch.zeros(1, 3), torch.zeros(1).long(), ["a"], {})  # fmt: skip
    clip = rollout_clip(groups, update=1)
    assert len(clip) == 3 and (clip[2][BAND + 16 : BAND + 112 : 2, 16:112:2] == flat[2, 8:56, 8:56].numpy()).all()
