"""Typed configuration: a YAML recipe plus dotted ``key=value`` overrides, checked before anything heavy loads.

    cfg = load_config("recipes/tiny_cpu.yaml", ["ppo.learning_rate=3e-5", "env.num_envs=4"])

Every field carries help text (``python -m rvla_peft.train --help-config`` prints it). An unknown key, a value
of the wrong type or an impossible value raises :class:`ConfigError` naming the key and, for a typo, the
nearest valid one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from rvla_peft.config.parsing import ConfigError, apply_override, check, from_dict, read_yaml, to_dict
from rvla_peft.config.policy import PolicyConfig, gripper_convention
from rvla_peft.perturbations.sampler import DEFAULT_EXPLORATION, DEFAULT_WINDOW
from rvla_peft.perturbations.specs import suite_settings, validate_specs
from rvla_peft.policies.action_tokens.configuration import ActionTokenPolicyConfig
from rvla_peft.policies.families import POLICY_VARIANTS, drop_keys_of_the_replaced_family, family_config
from rvla_peft.utils.constants import HUB_REPO_ID_PATTERN

# report_to: the trackers of Accelerate's tracker layer that robot-learning runs use (rvla_peft.tracking)
TRACKERS = ("tensorboard", "wandb", "swanlab")


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default="builtin:tiny-llava",
        metadata={
            "help": "Hub id or local folder of an image-text-to-text model (loaded with Auto classes), or "
            "'builtin:tiny-llava' / 'builtin:tiny-openvla', tiny random models built locally from a config (no "
            "download), or 'builtin:tiny-vla-maniskill', the small pretrained VLA shipped in the package "
            "(rvla_peft/assets/, made by rvla_peft.pretrain), or 'random:openvla-7b' / 'random:openvla-7b-oft' / "
            "'random:pi0' (and random:tiny-*), a published architecture with random weights built in memory on the "
            "run's device, for measuring a GPU without downloads (bench/gpu_acceptance.py). OpenVLA checkpoints "
            "(model_type 'openvla') load natively, without remote code."
        },
    )
    hub_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id recorded as the adapter's base_model_name_or_path. Defaults to name_or_path when "
            "that is a Hub id; set it when the base is loaded from a local folder."
        },
    )
    torch_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Dtype the base weights are loaded in."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel passed to from_pretrained ('sdpa', 'eager', ...)."}
    )
    quantization: Literal["none", "4bit", "8bit"] = field(
        default="none",
        metadata={
            "help": "QLoRA: load the frozen base quantized by bitsandbytes ('4bit': nf4 with double quantization, "
            "compute in torch_dtype; '8bit': LLM.int8). LoRA weights, value head and norms stay in float32."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint."})
    revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the base model."})
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "A warm-up adapter (folder or Hub id, e.g. the adapter/ of `rvla-sft`) that training starts from: "
            "its LoRA (and OpenVLA-OFT's heads) go on training, and a frozen copy of it is the reference policy "
            "(kl_to_base, the invariance teacher). It must be of this base and policy family. None: a fresh LoRA."
        },
    )
    processor_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Where the processor comes from when the checkpoint has none (pi0: the PaliGemma tokenizer, "
            "e.g. google/paligemma2-3b-mix-224); None: name_or_path."
        },
    )


@dataclass
class LoraSettings:
    """LoRA settings; a field left None takes the policy family's default (its ``LORA_DEFAULTS``)."""

    r: int | None = field(default=None, metadata={"help": "LoRA rank (None: the family's default)."})
    alpha: int | None = field(
        default=None, metadata={"help": "LoRA alpha, scale = alpha / r (None: the family's default)."}
    )
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names to adapt, or 'all-linear' (None: the family's default)."}
    )
    exclude_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names never adapted, peft's exclude_modules (None: the family's default)."},
    )
    adapt_output_layer: bool = field(
        default=False,
        metadata={
            "help": "Also adapt the output layer (lm_head), whose rows are the action-token logits, as RL4VLA does; "
            "peft's 'all-linear' leaves it out."
        },
    )


@dataclass
class EnvConfig:
    task: str = field(default="PickCube-v1", metadata={"help": "ManiSkill3 task id."})
    num_envs: int = field(default=2, metadata={"help": "Parallel environments per process."})
    image_size: int = field(default=64, metadata={"help": "Camera width and height in pixels."})
    camera: str = field(default="base_camera", metadata={"help": "Camera whose RGB image the policy sees."})
    control_mode: str = field(default="pd_ee_delta_pose", metadata={"help": "ManiSkill controller."})
    max_episode_steps: int = field(default=50, metadata={"help": "Time limit; the episode is truncated there."})
    reward_mode: str = field(default="normalized_dense", metadata={"help": "ManiSkill reward mode."})
    sim_backend: Literal["auto", "physx_cpu", "physx_cuda"] = field(
        default="auto", metadata={"help": "'auto': physx_cuda when CUDA exists, else CPU envs."}
    )
    render_backend: Literal["auto", "cpu", "gpu"] = field(
        default="auto", metadata={"help": "'auto': gpu with CUDA, else cpu (lavapipe)."}
    )
    render_detail: Literal["full", "fast"] = field(
        default="fast",
        metadata={
            "help": "CPU envs (physx_cpu): 'fast' draws the robot with 90%-decimated render meshes and the ground as "
            "2 triangles (physics untouched; needs fast-simplification, in the 'sim' extra). On lavapipe a 64x64 "
            "step costs what its triangles cost: PushCube goes from ~157k to ~15k triangles, 3-5x more env steps/s; "
            "frames differ by <1/255 mean abs (a few outline pixels); the shipped base's clean PushCube success is "
            "99% with either. 'full': ManiSkill's own meshes. GPU envs always draw full detail (the CUDA renderer "
            "is not triangle-bound). README, 'Rendering on the CPU'."
        },
    )
    vectorization: Literal["sync", "async"] = field(
        default="sync",
        metadata={"help": "CPU only: gymnasium SyncVectorEnv (one process) or AsyncVectorEnv (a worker per env)."},
    )
    instruction: str | None = field(
        default=None, metadata={"help": "Instruction text; None uses the task's built-in instruction."}
    )
    state_keys: list[str] = field(
        default_factory=lambda: ["agent.qpos", "extra.tcp_pose"],
        metadata={"help": "Observation entries concatenated into obs['state'] (dotted paths)."},
    )
    privileged_state: bool = field(
        default=False,
        metadata={
            "help": "Also ask ManiSkill for privileged state (obs_mode 'rgb+state_dict'), so that state_keys may name "
            "object poses such as extra.obj_pose (scripted experts, demos); the policy sees only rgb + instruction."
        },
    )
    restart_dead_workers: bool = field(
        default=True,
        metadata={
            "help": "vectorization=async: when an env worker process dies (OOM killer, a crash in the simulator), "
            "rebuild the workers and go on; the episodes in flight are dropped (ended as truncated, marked in "
            "Step.dropped, counted in dropped_episodes) and a warning names the worker. On by default: a long run "
            "should not lose hours to one dead worker. false: stop with an EnvWorkerError naming it."
        },
    )


@dataclass
class PerturbationSpec:
    name: str = field(
        metadata={
            "help": "Perturbation name (see rvla_peft.perturbations.PERTURBATIONS), or a combination "
            "'rotation+action_noise'; a part may set its own severity: 'rotation@0.5+action_noise'."
        }
    )
    severity: float = field(default=0.5, metadata={"help": "Strength in [0, 1], mapped to a physical range."})
    resample: Literal["episode", "step"] | None = field(
        default=None,
        metadata={
            "help": "When the random parameters are drawn: 'episode' (held for the episode), 'step' (redrawn every "
            "step); None: each perturbation's own (README); applies to every part of a combination without its own "
            "':episode'/':step'."
        },
    )


@dataclass
class CurriculumConfig:
    schedule: Literal["none", "linear", "step", "success"] = field(
        default="none",
        metadata={
            "help": "Scale multiplying every perturb.train severity over training (RobustVLA-C): 'none': 1; "
            "'linear': start -> 1 over ramp_updates; 'step': the same in `stages` jumps; 'success': start, "
            "+increment after each update whose rollout success rate >= success_threshold."
        },
    )
    start: float = field(default=0.0, metadata={"help": "Scale at the first update, in [0, 1]."})
    ramp_updates: int = field(default=10, metadata={"help": "'linear'/'step': updates until the scale reaches 1."})
    stages: int = field(default=4, metadata={"help": "'step': number of equal jumps from start to 1."})
    success_threshold: float = field(
        default=0.5, metadata={"help": "'success': rollout success rate in [0, 1] that raises the scale."}
    )
    increment: float = field(default=0.1, metadata={"help": "'success': scale added per successful update."})

    def __post_init__(self) -> None:
        # On construction, so load_config stops on a bad value like any other; the section lives only here.
        check(0 <= self.start <= 1, "perturb.curriculum.start", "must be in [0, 1]")
        check(self.ramp_updates >= 1, "perturb.curriculum.ramp_updates", "must be >= 1")
        check(self.stages >= 1, "perturb.curriculum.stages", "must be >= 1")
        check(0 <= self.success_threshold <= 1, "perturb.curriculum.success_threshold", "must be in [0, 1]")
        check(0 < self.increment <= 1, "perturb.curriculum.increment", "must be in (0, 1]")


@dataclass
class PerturbConfig:
    train: list[PerturbationSpec] = field(
        default_factory=list, metadata={"help": "Perturbations applied while collecting training rollouts."}
    )
    eval: list[PerturbationSpec] = field(
        default_factory=list, metadata={"help": "Perturbed settings evaluated periodically (besides clean)."}
    )
    eval_suite: str | None = field(
        default=None,
        metadata={
            "help": "Named suite of rvla_peft.eval (quick, paper, full) also evaluated periodically, "
            "logged as eval/<setting>/success_rate."
        },
    )
    sample_per_episode: bool = field(
        default=False,
        metadata={
            "help": "Training: each env draws ONE perturb.train entry (a combination counts as one) at every "
            "episode start, instead of all of them applying together."
        },
    )
    sampler: Literal["uniform", "adversarial"] = field(
        default="uniform",
        metadata={
            "help": "With sample_per_episode, how each episode's perturb.train entry is chosen: 'uniform' (at "
            "random), or 'adversarial': a UCB bandit on failure, the entry with the highest failure rate over the "
            "last sampler_window finished episodes plus sampler_exploration * sqrt(ln N / n) (N episodes in the "
            "window and running, n of them under the entry; an entry with none is tried first). Logged per update "
            "as perturb/choice_<entry>, the share of the episodes started under each. algorithm=ppo only."
        },
    )
    sampler_exploration: float = field(
        default=DEFAULT_EXPLORATION,
        metadata={
            "help": "The adversarial sampler's exploration constant c, >= 0 (0: always the entry failing most). The "
            "default 1/sqrt(2) is Hoeffding's bound at level 1/N for a 0/1 outcome; UCB1's sqrt(2) explores more."
        },
    )
    sampler_window: int = field(
        default=DEFAULT_WINDOW,
        metadata={
            "help": "The adversarial sampler's memory: the failure rates are over this many most recent finished "
            "training episodes (all entries together); an entry with none of them is tried again."
        },
    )
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def __post_init__(self) -> None:
        check(
            self.sampler_exploration >= 0 and math.isfinite(self.sampler_exploration),
            "perturb.sampler_exploration",
            f"must be a finite number >= 0, got {self.sampler_exploration}",
        )
        check(self.sampler_window >= 1, "perturb.sampler_window", f"must be >= 1 episode, got {self.sampler_window}")
        if self.sampler == "adversarial":
            check(
                self.sample_per_episode,
                "perturb.sampler",
                "'adversarial' chooses each episode's perturb.train entry: set perturb.sample_per_episode=true",
            )
            check(
                len(self.train) >= 2,
                "perturb.sampler",
                f"'adversarial' chooses between perturb.train entries: it needs at least 2, got {len(self.train)}",
            )


@dataclass
class PPOConfig:
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate."})
    num_steps: int = field(default=32, metadata={"help": "Rollout length per env per update."})
    num_minibatches: int = field(default=4, metadata={"help": "Minibatches per epoch."})
    update_epochs: int = field(default=2, metadata={"help": "Passes over each rollout."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches each minibatch is split into (saves memory)."}
    )
    gamma: float = field(default=0.99, metadata={"help": "Discount factor."})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda."})
    clip_coef: float = field(default=0.2, metadata={"help": "PPO ratio clip."})
    clip_vloss: bool | float = field(
        default=False,
        metadata={
            "help": "Clip the value loss around the rollout's values (CleanRL's pessimistic form): a number is the "
            "range in return units; true: +-clip_coef; false: no clipping. Off by default: +-0.2 suits returns "
            "normalised to unit scale, but a zero-initialised critic on sparse [0, 1] returns then needs several "
            "updates to reach them, and value clipping did not help PPO in Andrychowicz et al. 2021."
        },
    )
    vf_coef: float = field(default=0.5, metadata={"help": "Value loss weight."})
    ent_coef: float = field(default=0.0, metadata={"help": "Entropy bonus weight."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Global gradient-norm clip."})
    target_kl: float | None = field(
        default=None,
        metadata={
            "help": "Stop the update early once the running mean of approx_kl over the epoch's minibatches so far "
            "exceeds this (None: never); checked after every optimizer step, the same decision on every rank."
        },
    )
    norm_adv: Literal["minibatch", "batch", "none"] | bool = field(
        default="minibatch",
        metadata={
            "help": "Advantage normalisation (PPO): 'minibatch' (CleanRL; true means this), 'batch' (once over the "
            "whole rollout: a minibatch without a single success is not rescaled to unit variance), or 'none' "
            "(false). Group algorithms never renormalise their advantages."
        },
    )
    critic_warmup_updates: int = field(
        default=0,
        metadata={
            "help": "The first N updates train the value head only (the policy frozen, no regularisers): a critic "
            "that starts at zero otherwise feeds PPO advantages that are mostly its own error."
        },
    )
    value_detach_features: bool = field(
        default=False,
        metadata={
            "help": "The value head reads detached hidden states: the value loss trains the head only, never the "
            "LoRA weights that also produce the action logits."
        },
    )

    @property
    def value_clip_range(self) -> float | None:
        """The value loss's clip range in return units (``clip_vloss``), None when unclipped."""
        if self.clip_vloss is True:
            return self.clip_coef
        return None if self.clip_vloss is False else float(self.clip_vloss)

    def __post_init__(self) -> None:
        # Old recipes wrote norm_adv: true / false.
        if self.norm_adv is True:
            self.norm_adv = "minibatch"
        elif self.norm_adv is False:
            self.norm_adv = "none"


@dataclass
class GroupConfig:
    size: int = field(
        default=8, metadata={"help": "G: episodes per group, all from the same initial state and perturbation draw."}
    )
    num_groups: int = field(
        default=4, metadata={"help": "Groups with differing outcomes that one update trains on (per process)."}
    )
    max_resample: int = field(
        default=3,
        metadata={
            "help": "Dynamic sampling: rounds of env.num_envs new groups collected beyond those needed when every "
            "group is kept, to replace groups whose outcomes are all equal; the update trains on what was kept."
        },
    )
    outcome: Literal["success", "return"] = field(
        default="success", metadata={"help": "An episode's outcome: success (0/1) or its return."}
    )
    dynamic_sampling: bool = field(
        default=True, metadata={"help": "Drop groups whose outcomes are all equal (and collect more)."}
    )


@dataclass
class JacobianConfig:
    weight: float = field(default=0.0, metadata={"help": "alpha: weight of the Jacobian penalty (0 = off, free)."})
    form: Literal["hutchinson", "grad_penalty"] = field(
        default="hutchinson",
        metadata={
            "help": "'hutchinson': ||d mean_action / d pixel_values||_F^2 with Rademacher probes; "
            "'grad_penalty': min(||d log pi(a|s) / d s||^2, g_max), s = visual embeddings (the paper)."
        },
    )
    num_probes: int = field(default=1, metadata={"help": "Hutchinson probes per sample."})
    fraction: float = field(default=0.25, metadata={"help": "Share of each minibatch the penalty is computed on."})
    g_max: float = field(default=10.0, metadata={"help": "Clip of the squared gradient norm ('grad_penalty')."})


@dataclass
class SmoothnessConfig:
    weight: float = field(default=0.0, metadata={"help": "beta: weight of the smoothness penalty (0 = off)."})
    form: Literal["old_policy", "temporal"] = field(
        default="old_policy",
        metadata={
            "help": "'old_policy': E||mu(s) - mu_old(s)||^2 (the paper); "
            "'temporal': E||mu(s_t) - mu(s_t+1)||^2 within an episode (CAPS)."
        },
    )
    fraction: float = field(default=0.25, metadata={"help": "'temporal': share of each minibatch used."})


@dataclass
class InvarianceConfig:
    weight: float = field(
        default=0.0,
        metadata={
            "help": "gamma: weight of the divergence between the action distributions on the perturbed and on the "
            "clean frame of the same step (see form, target), the clean frame kept by the rollout (perturbations act "
            "after rendering) and taken as the target (0: off; ppo only)."
        },
    )
    form: Literal["sampled", "exact"] = field(
        default="sampled",
        metadata={
            "help": "'sampled': the k3 estimate on the rollout's whole actions (any policy family); 'exact' (token "
            "policies): the per-slot KL(pi(.|clean) || pi(.|perturbed)) over all bins, teacher-forced on the "
            "rollout's earlier tokens, summed over slots; the distillation gradient the sampled form has only in "
            "expectation."
        },
    )
    target: Literal["base", "current"] = field(
        default="base",
        metadata={
            "help": "The clean-frame side: 'base', the adapter switched off (with model.adapter: the frozen warm-up "
            "adapter; a fixed teacher, so the penalty cannot "
            "be met by a policy whose actions on both frames agree and are worse), or 'current', the policy being "
            "trained (no gradient through it). Under shift@0.5, 'base' kept clean success where 'current' lost it "
            "(README, Does RL improve the shipped base?)."
        },
    )
    fraction: float = field(default=0.25, metadata={"help": "Share of each minibatch used (one extra forward pass)."})


@dataclass
class RegularizerConfig:
    jacobian: JacobianConfig = field(default_factory=JacobianConfig)
    smoothness: SmoothnessConfig = field(default_factory=SmoothnessConfig)
    invariance: InvarianceConfig = field(default_factory=InvarianceConfig)


@dataclass
class HubConfig:
    push_to_hub: bool = field(
        default=False,
        metadata={
            "help": "At the end of training, push the adapter, value head, model card, recipe and training curve to "
            "hub.repo_id in one commit (as `python -m rvla_peft.hub push OUTPUT_DIR` does). The token comes from "
            "HF_TOKEN or `hf auth login`, never from the recipe."
        },
    )
    repo_id: str | None = field(
        default=None, metadata={"help": "Hub repo 'user/name' (or 'name': under the logged-in user)."}
    )
    private: bool = field(
        default=False, metadata={"help": "Create the repo private (an existing repo keeps its visibility)."}
    )
    revision: str | None = field(
        default=None, metadata={"help": "Branch the final push goes to (None: main); created from main if missing."}
    )
    push_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Also push every save_every checkpoint to hub.checkpoint_revision (a failed checkpoint push "
            "only warns: training goes on)."
        },
    )
    checkpoint_revision: str = field(default="checkpoints", metadata={"help": "Branch the checkpoints go to."})


@dataclass
class TrainConfig:
    output_dir: str = field(default="outputs/run", metadata={"help": "Where the adapter, logs and checkpoints go."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an output_dir that already holds an adapter or checkpoints (they are replaced)."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "'latest' (the newest of output_dir/checkpoints; `--resume`) or a checkpoint folder: continue "
            "that run (weights, optimizer, update, curriculum, every RNG); README, Reliability."
        },
    )
    max_consecutive_skips: int = field(
        default=5,
        metadata={
            "help": "An optimizer step whose loss or gradient norm is not finite is skipped (train/skipped_steps); "
            "this many in a row stop the run with an error."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of envs, sampling and initialisation."})
    total_updates: int = field(default=10, metadata={"help": "PPO updates (rollout + optimisation) to run."})
    algorithm: Literal["ppo", "rloo", "grpo", "distill"] = field(
        default="ppo",
        metadata={
            "help": "'ppo': GAE advantages from a value head over T steps x N envs (the ppo section). 'rloo' / "
            "'grpo': critic-free, groups of group.size episodes from one initial state and perturbation draw, each "
            "episode's advantage its outcome minus the mean of the others (rloo) or group-normalised (grpo), groups "
            "of equal outcomes dropped and refilled; PPO's clipped surrogate (ppo.clip_coef, update_epochs, "
            "num_minibatches, target_kl) on those advantages, no value loss. 'distill': no reward at all; on-policy "
            "distillation of the reference policy's action distribution on the clean frame onto the policy on the "
            "perturbed frame of the same step, over the states the policy visits (T steps x N envs as ppo; the exact "
            "per-slot KL for token policies, the k3 estimate on the rollout's actions otherwise); the penalties and "
            "kl_to_base add to it as with ppo."
        },
    )
    kl_to_base: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a KL penalty to the base policy (the same model with the adapter switched off: no "
            "second copy; with model.adapter, the frozen warm-up adapter), k3 estimator per sample. "
            "policy/kl_to_base is logged whatever the weight."
        },
    )
    kl_to_base_frames: Literal["rollout", "clean"] = field(
        default="rollout",
        metadata={
            "help": "Where the kl_to_base penalty looks. 'rollout': the frames the policy acted on (perturbed ones "
            "included), so it also holds the policy to the base's behaviour under the perturbation. 'clean': the "
            "clean frames of the same steps (rendered before the observation perturbations, kept by the rollout; "
            "algorithm=ppo), so it anchors only the behaviour where the base is good and leaves the perturbed frames "
            "free to move (toward the base's clean actions, with regularizers.invariance.target=base). "
            "policy/kl_to_base is logged on the rollout's frames either way."
        },
    )
    eval_sampled: bool = field(
        default=False,
        metadata={
            "help": "Also evaluate the sampled policy (at policy.temperature), which is what RL optimises, as "
            "eval_sampled/<setting>/success_rate; eval/ is the argmax policy."
        },
    )
    probe_frames: int = field(
        default=32,
        metadata={
            "help": "Frames of the first rollout kept to log policy/argmax_changed: the share of deterministic "
            "action dimensions that differ from the base's (0: off)."
        },
    )
    grad_share_every: int = field(
        default=10,
        metadata={
            "help": "Every N updates (0: never), log grad/norm_<term> and grad/share_<term>: each loss term's "
            "gradient norm on the trainable parameters, and its share of their sum (one extra backward per term, on "
            "one micro-batch). A penalty with a share near 0 does nothing; bench/calibrate_penalties.py sets weights."
        },
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata={"help": "Autocast precision for forward passes."}
    )
    cpu: bool = field(default=False, metadata={"help": "Force the CPU even where CUDA exists."})
    update_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads for each update (and its passes over the base policy); rollouts and "
            "evaluations keep torch's count (OMP_NUM_THREADS). None: torch's count throughout. On the 2-core "
            "machine, 2 took an update of recipes/tiny_cpu.yaml from 6.0 to 3.3 s (make demo sets it). Leave it "
            "unset when other jobs share the cores: OpenMP threads waiting on a busy core made updates 5-10x slower."
        },
    )
    eval_every: int = field(default=0, metadata={"help": "Evaluate every N updates (0: only at the end)."})
    eval_episodes: int = field(default=4, metadata={"help": "Episodes per evaluated setting (0: no eval)."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N updates (0: never)."})
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={
            "help": "Trackers, each through Accelerate with the metric names of metrics.jsonl: 'tensorboard' "
            "(OUTPUT_DIR/rvla_peft/), 'wandb' (Weights & Biases, the track extra; OUTPUT_DIR/wandb/ unless WANDB_DIR "
            "is set; WANDB_MODE=offline works without an account), 'swanlab' (pip install swanlab); [] for none. "
            "tensorboard and wandb are tested here."
        },
    )
    video_every: int = field(
        default=0,
        metadata={
            "help": "Every N updates (0: off), a clip of the frames env 0 saw in that update's rollout (and the "
            "clean frames beside them where the run keeps them) to OUTPUT_DIR/videos/update-N.gif, logged as "
            "rollout/video: to wandb as a video of that GIF, to TensorBoard as a strip of 8 of its frames (its "
            "add_video needs moviepy), to other trackers not at all. Needs the video extra."
        },
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(
        default_factory=ActionTokenPolicyConfig,
        metadata={"variants": POLICY_VARIANTS},  # policy.family picks the family's class (rvla_peft/policies/*/)
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    env: EnvConfig = field(default_factory=EnvConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    regularizers: RegularizerConfig = field(default_factory=RegularizerConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    @property
    def uses_critic(self) -> bool:
        """PPO trains the value head for GAE; the group algorithms take advantages from their groups, distillation
        needs none."""
        return self.algorithm == "ppo"

    @property
    def uses_groups(self) -> bool:
        """rloo / grpo collect groups of whole episodes; ppo and distill collect T steps x N envs."""
        return self.algorithm in ("rloo", "grpo")

    @property
    def kl_on_clean_frames(self) -> bool:
        return self.kl_to_base > 0 and self.kl_to_base_frames == "clean"

    def validate(self) -> None:
        """Values that parse but cannot work. Raises ConfigError naming the key."""
        check(self.total_updates >= 1, "total_updates", "must be >= 1")
        check(self.lora.r is None or self.lora.r >= 1, "lora.r", "must be >= 1")
        check(0 <= self.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
        check(self.env.num_envs >= 1, "env.num_envs", "must be >= 1")
        check(self.env.image_size >= 16, "env.image_size", "must be >= 16 pixels")
        check(self.env.max_episode_steps >= 1, "env.max_episode_steps", "must be >= 1")
        policy = family_config(self.policy)
        if self.policy.gripper is None:  # the base's convention, kept in every recipe this config is saved as
            self.policy.gripper = policy.gripper = gripper_convention(policy, self.model.name_or_path)
        policy.validate(self)  # the shared keys and the family's own
        ppo = self.ppo
        check(ppo.learning_rate > 0, "ppo.learning_rate", "must be > 0")
        check(ppo.num_steps >= 1, "ppo.num_steps", "must be >= 1")
        check(ppo.update_epochs >= 1, "ppo.update_epochs", "must be >= 1")
        check(0 < ppo.gamma <= 1, "ppo.gamma", "must be in (0, 1]")
        check(0 <= ppo.gae_lambda <= 1, "ppo.gae_lambda", "must be in [0, 1]")
        check(ppo.clip_coef > 0, "ppo.clip_coef", "must be > 0")
        check(ppo.max_grad_norm > 0, "ppo.max_grad_norm", "must be > 0")
        check(
            ppo.clip_vloss is False or ppo.clip_vloss is True or ppo.clip_vloss > 0,
            "ppo.clip_vloss",
            "must be true, false or a range > 0",
        )
        check(ppo.critic_warmup_updates >= 0, "ppo.critic_warmup_updates", "must be >= 0")
        check(self.kl_to_base >= 0, "kl_to_base", "must be >= 0")
        check(
            self.kl_to_base_frames == "rollout" or not self.uses_groups,
            "kl_to_base_frames",
            "'clean' needs algorithm=ppo or distill (group rollouts do not keep the clean frames)",
        )
        check(self.probe_frames >= 0, "probe_frames", "must be >= 0")
        check(self.update_threads is None or self.update_threads >= 1, "update_threads", "must be >= 1 (or null)")
        group = self.group
        check(group.size >= 2, "group.size", "must be >= 2: an advantage compares an episode with its group")
        check(group.num_groups >= 1, "group.num_groups", "must be >= 1")
        check(group.max_resample >= 0, "group.max_resample", "must be >= 0")
        if not self.uses_groups:
            batch = ppo.num_steps * self.env.num_envs
            where = f"num_steps * env.num_envs = {batch}"
        else:
            batch = group.num_groups * group.size  # at least one step per episode
            where = f"group.num_groups * group.size = {batch}"
        check(
            ppo.critic_warmup_updates == 0 or self.uses_critic,
            "ppo.critic_warmup_updates",
            f"has no critic to warm up with algorithm={self.algorithm}",
        )
        check(1 <= ppo.num_minibatches <= batch, "ppo.num_minibatches", f"must be in [1, {where}]")
        minibatch = batch // ppo.num_minibatches
        check(
            1 <= ppo.gradient_accumulation_steps <= minibatch,
            "ppo.gradient_accumulation_steps",
            f"must be in [1, minibatch size = {minibatch}]",
        )
        jac, smooth = self.regularizers.jacobian, self.regularizers.smoothness
        check(jac.weight >= 0, "regularizers.jacobian.weight", "must be >= 0")
        check(jac.num_probes >= 1, "regularizers.jacobian.num_probes", "must be >= 1")
        check(0 < jac.fraction <= 1, "regularizers.jacobian.fraction", "must be in (0, 1]")
        check(jac.g_max > 0, "regularizers.jacobian.g_max", "must be > 0")
        check(smooth.weight >= 0, "regularizers.smoothness.weight", "must be >= 0")
        check(0 < smooth.fraction <= 1, "regularizers.smoothness.fraction", "must be in (0, 1]")
        inv = self.regularizers.invariance
        check(inv.weight >= 0, "regularizers.invariance.weight", "must be >= 0")
        check(0 < inv.fraction <= 1, "regularizers.invariance.fraction", "must be in (0, 1]")
        check(
            inv.weight == 0 or not self.uses_groups,
            "regularizers.invariance.weight",
            "needs algorithm=ppo or distill (group rollouts do not keep the clean frames)",
        )
        check(
            inv.form != "exact" or isinstance(policy, ActionTokenPolicyConfig),
            "regularizers.invariance.form",
            f"'exact' needs a token policy (action_tokens, openvla), not {self.policy.family!r}: use 'sampled'",
        )
        check(self.eval_every >= 0 and self.save_every >= 0, "eval_every/save_every", "must be >= 0")
        check(self.max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1")
        check(self.grad_share_every >= 0, "grad_share_every", "must be >= 0 (0: off)")
        # PPO's episodes restart after each checkpoint and evaluation (so that a resumed run continues exactly):
        # restarted more often than an episode lasts, no episode would ever end and no success would be seen.
        for key, every in (
            ("save_every", self.save_every),
            ("eval_every", self.eval_every if self.eval_episodes else 0),
        ):
            check(
                self.uses_groups or every == 0 or every * self.ppo.num_steps >= self.env.max_episode_steps,
                key,
                f"x ppo.num_steps ({every} x {self.ppo.num_steps}) is shorter than an episode (env.max_episode_steps="
                f"{self.env.max_episode_steps}), and episodes restart at each checkpoint and evaluation: set {key} >= "
                f"{-(-self.env.max_episode_steps // self.ppo.num_steps)}",
            )
        check(self.eval_episodes >= 0, "eval_episodes", "must be >= 0")
        check(
            self.perturb.sampler == "uniform" or not self.uses_groups,
            "perturb.sampler",
            f"'adversarial' needs algorithm=ppo or distill: the members of a {self.algorithm} group replay one "
            "perturbation draw",
        )
        for key in ("train", "eval"):
            try:
                validate_specs(getattr(self.perturb, key))
            except ValueError as e:
                raise ConfigError(f"perturb.{key}: {e}") from None
        if self.perturb.eval_suite is not None:
            try:
                suite_settings(self.perturb.eval_suite)
            except ValueError as e:
                raise ConfigError(f"perturb.eval_suite: {e}") from None
        hub = self.hub
        check(
            bool(hub.repo_id) or not (hub.push_to_hub or hub.push_checkpoints),
            "hub.repo_id",
            "is required with hub.push_to_hub or hub.push_checkpoints, e.g. hub.repo_id=user/robust-adapter",
        )
        check(
            hub.repo_id is None or re.fullmatch(HUB_REPO_ID_PATTERN, hub.repo_id) is not None,
            "hub.repo_id",
            f"{hub.repo_id!r} is not a Hub repo id like 'user/name'",
        )
        check(not hub.push_checkpoints or self.save_every > 0, "hub.push_checkpoints", "needs save_every > 0")
        for tracker in self.report_to:
            check(tracker in TRACKERS, "report_to", f"unknown tracker {tracker!r}; use a list of {TRACKERS} or []")
        check(len(set(self.report_to)) == len(self.report_to), "report_to", "names a tracker twice")
        check(self.video_every >= 0, "video_every", "must be >= 0 (0: off)")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training recipe (or the defaults when ``path`` is None), apply overrides, validate."""
    return load_recipe(TrainConfig, path, overrides)


def load_recipe(config_class: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """A recipe of ``config_class`` (a dataclass with ``validate()``, e.g. TrainConfig or the warm-up's SFTConfig):
    the YAML file (or the defaults), the ``key=value`` overrides, then the checks."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} not found; see the recipes/ folder for examples")
        data = read_yaml(path) or {}  # a syntax error: one line with the file, line and column
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping of sections")
    recipe_policy = dict(data["policy"]) if isinstance(data.get("policy"), dict) else {}  # overrides edit in place
    for override in overrides or []:
        apply_override(data, override)
    if isinstance(data.get("policy"), dict):
        data["policy"] = drop_keys_of_the_replaced_family(data["policy"], recipe_policy)
    cfg = from_dict(config_class, data)
    cfg.validate()
    return cfg


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
