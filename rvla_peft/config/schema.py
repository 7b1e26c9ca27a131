"""Typed configuration: a YAML recipe plus dotted ``key=value`` overrides, checked before anything heavy loads.

    cfg = load_config("recipes/tiny_cpu.yaml", ["ppo.learning_rate=3e-5", "env.num_envs=4"])

Every field carries help text (``python -m rvla_peft.train --help-config`` prints it). An unknown key, a value
of the wrong type or an impossible value raises :class:`ConfigError` naming the key and, for a typo, the
nearest valid one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from rvla_peft.config.parsing import ConfigError, apply_override, check, from_dict, to_dict
from rvla_peft.perturbations.specs import suite_settings, validate_specs
from rvla_peft.policies.families import POLICY_FAMILIES
from rvla_peft.utils.constants import HUB_REPO_ID_PATTERN


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default="builtin:tiny-llava",
        metadata={
            "help": "Hub id or local folder of an image-text-to-text model (loaded with Auto classes), or "
            "'builtin:tiny-llava' / 'builtin:tiny-openvla', tiny random models built locally from a config (no "
            "download), or 'builtin:tiny-vla-maniskill', the small pretrained VLA shipped in the package "
            "(rvla_peft/assets/, made by rvla_peft.pretrain). OpenVLA checkpoints (model_type 'openvla') load "
            "natively, without remote code."
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
    processor_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Where the processor comes from when the checkpoint has none (pi0: the PaliGemma tokenizer, "
            "e.g. google/paligemma2-3b-mix-224); None: name_or_path."
        },
    )


@dataclass
class PolicyConfig:
    family: str = field(
        default="action_tokens",
        metadata={
            "help": "Policy family (see rvla_peft.policies.registry): 'action_tokens' = OpenVLA-style over any "
            "image-text-to-text model; 'openvla' = OpenVLA checkpoints (their action ids, norm_stats and prompt); "
            "'pi0' = transformers' PI0, PPO over its flow-SDE denoising chain; 'openvla_oft' = OpenVLA-OFT "
            "(parallel decoding of an action chunk, continuous action head, learned Gaussian/Laplace scale)."
        },
    )
    prompt_template: str = field(
        default="In: What action should the robot take to {instruction}?\nOut:",
        metadata={"help": "Prompt; {instruction} is replaced by the task's instruction."},
    )
    action_dim: int = field(default=7, metadata={"help": "Dimensions of the action the env executes."})
    n_bins: int = field(default=256, metadata={"help": "Action bins, on the last n_bins vocabulary ids."})
    action_low: list[float] | None = field(
        default=None,
        metadata={"help": "Per-dimension q01 used to un-normalise [-1, 1] to env actions (None: identity)."},
    )
    action_high: list[float] | None = field(
        default=None, metadata={"help": "Per-dimension q99 used to un-normalise (None: identity)."}
    )
    unnorm_key: str | None = field(
        default=None,
        metadata={
            "help": "Families 'openvla', 'openvla_oft': the dataset in the checkpoint's norm_stats whose action "
            "q01/q99 (and mask) "
            "un-normalise actions, e.g. 'bridge_orig' (None: action_low/action_high)."
        },
    )
    value_head_hidden: int = field(default=256, metadata={"help": "Width of the value head's hidden layer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of action tokens."})
    num_denoise_steps: int | None = field(
        default=None,
        metadata={
            "help": "Family 'pi0': denoising steps K per action chunk (None: the checkpoint's num_inference_steps)."
        },
    )
    noise_level: float = field(
        default=0.5,
        metadata={
            "help": "Family 'pi0': flow-SDE noise level a; each denoising step adds Gaussian noise of std "
            "sqrt(dt) * a * sqrt(t / (1 - t)) to the executed actions (RLinf's flow-SDE; 0.5 is its default)."
        },
    )
    execute_steps: int | None = field(
        default=None,
        metadata={
            "help": "Families 'pi0', 'openvla_oft': actions of each predicted chunk executed open-loop as one PPO "
            "step (None: the whole chunk)."
        },
    )
    chunk_size: int = field(
        default=8,
        metadata={
            "help": "Family 'openvla_oft': actions predicted per forward pass (OFT's NUM_ACTIONS_CHUNK, not in its "
            "config.json: 8 for the LIBERO checkpoints, 25 ALOHA, 5 Bridge)."
        },
    )
    action_distribution: Literal["gaussian", "laplace"] = field(
        default="laplace",
        metadata={
            "help": "Family 'openvla_oft': distribution around the action head's output for PPO's log-probs. "
            "'laplace' (RIPT-VLA's; the likelihood whose maximum is OFT's L1 regression) or 'gaussian'."
        },
    )
    scale_head: Literal["state_independent", "state_dependent"] = field(
        default="state_independent",
        metadata={
            "help": "Family 'openvla_oft': the distribution's scale. 'state_independent': a learned log-scale per "
            "chunk step and action dim; 'state_dependent': RIPT-VLA's scale head (an MLP over the action features)."
        },
    )
    init_log_scale: float = field(
        default=-2.0,
        metadata={"help": "Family 'openvla_oft': initial log-scale (std or Laplace b) of normalised actions."},
    )
    log_scale_bounds: list[float] = field(
        default_factory=lambda: [-5.0, 0.5],
        metadata={"help": "Family 'openvla_oft': [min, max] the log-scale is clamped to (RIPT-VLA: [-2, 0.5])."},
    )
    action_head_file: str | None = field(
        default=None,
        metadata={
            "help": "Family 'openvla_oft': OFT's released action head to start from, e.g. "
            "'action_head--150000_checkpoint.pt': a file path, or a file name in the base model's folder or Hub "
            "repo (None: a freshly initialised head)."
        },
    )
    use_state: bool = field(
        default=False,
        metadata={
            "help": "Family 'pi0': feed obs['state'] (zero-padded to max_state_dim) as pi0's robot state; false: a "
            "zero state. The rollout buffer keeps no state, so PPO training needs false."
        },
    )


@dataclass
class LoraSettings:
    """LoRA settings; a field left None takes the policy family's default (``registry.LORA_DEFAULTS``)."""

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


@dataclass
class PerturbationSpec:
    name: str = field(
        metadata={
            "help": "Perturbation name (see rvla_peft.perturbations.PERTURBATIONS), or a combination "
            "'rotation+action_noise'; a part may set its own severity: 'rotation@0.5+action_noise'."
        }
    )
    severity: float = field(default=0.5, metadata={"help": "Strength in [0, 1], mapped to a physical range."})


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
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)


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
    clip_vloss: bool = field(default=True, metadata={"help": "Clip the value loss around the old values."})
    vf_coef: float = field(default=0.5, metadata={"help": "Value loss weight."})
    ent_coef: float = field(default=0.0, metadata={"help": "Entropy bonus weight."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Global gradient-norm clip."})
    target_kl: float | None = field(
        default=None, metadata={"help": "Stop the epochs early when approx KL exceeds this (None: never)."}
    )
    norm_adv: bool = field(default=True, metadata={"help": "Normalise advantages per minibatch."})


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
class RegularizerConfig:
    jacobian: JacobianConfig = field(default_factory=JacobianConfig)
    smoothness: SmoothnessConfig = field(default_factory=SmoothnessConfig)


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
        default=False, metadata={"help": "Allow writing into an output_dir that already holds an adapter."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of envs, sampling and initialisation."})
    total_updates: int = field(default=10, metadata={"help": "PPO updates (rollout + optimisation) to run."})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata={"help": "Autocast precision for forward passes."}
    )
    cpu: bool = field(default=False, metadata={"help": "Force the CPU even where CUDA exists."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every N updates (0: only at the end)."})
    eval_episodes: int = field(default=4, metadata={"help": "Episodes per evaluated setting (0: no eval)."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N updates (0: never)."})
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": "Trackers: 'tensorboard' or none ([])."}
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    env: EnvConfig = field(default_factory=EnvConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    regularizers: RegularizerConfig = field(default_factory=RegularizerConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def validate(self) -> None:
        """Values that parse but cannot work. Raises ConfigError naming the key."""
        check(self.total_updates >= 1, "total_updates", "must be >= 1")
        check(self.lora.r is None or self.lora.r >= 1, "lora.r", "must be >= 1")
        check(0 <= self.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
        check(self.env.num_envs >= 1, "env.num_envs", "must be >= 1")
        check(self.env.image_size >= 16, "env.image_size", "must be >= 16 pixels")
        check(self.env.max_episode_steps >= 1, "env.max_episode_steps", "must be >= 1")
        check(self.policy.action_dim >= 1, "policy.action_dim", "must be >= 1")
        check(self.policy.n_bins >= 2, "policy.n_bins", "must be >= 2")
        check(self.policy.temperature > 0, "policy.temperature", "must be > 0")
        check(self.policy.noise_level > 0, "policy.noise_level", "must be > 0")
        for key in ("num_denoise_steps", "execute_steps"):
            value = getattr(self.policy, key)
            check(value is None or value >= 1, f"policy.{key}", "must be >= 1 (or null)")
        check(self.policy.chunk_size >= 1, "policy.chunk_size", "must be >= 1")
        if self.policy.family == "openvla_oft":
            steps = self.policy.execute_steps
            check(
                steps is None or steps <= self.policy.chunk_size,
                "policy.execute_steps",
                f"must be <= policy.chunk_size={self.policy.chunk_size}",
            )
            check(
                not self.lora.adapt_output_layer,
                "lora.adapt_output_layer",
                "must be false for policy.family=openvla_oft: its forward never computes logits",
            )
        bounds = self.policy.log_scale_bounds
        check(len(bounds) == 2 and bounds[0] < bounds[1], "policy.log_scale_bounds", f"needs [min, max], got {bounds}")
        check("{instruction}" in self.policy.prompt_template, "policy.prompt_template", "must contain {instruction}")
        for key in ("action_low", "action_high"):
            value = getattr(self.policy, key)
            check(
                value is None or len(value) == self.policy.action_dim,
                f"policy.{key}",
                f"needs {self.policy.action_dim} values (policy.action_dim), got {value and len(value)}",
            )
        if self.policy.unnorm_key is not None:
            check(
                self.policy.family in ("openvla", "openvla_oft"),
                "policy.unnorm_key",
                "is read by policy.family=openvla or openvla_oft only",
            )
            check(
                self.policy.action_low is None and self.policy.action_high is None,
                "policy.unnorm_key",
                "set either policy.unnorm_key or policy.action_low/action_high, not both",
            )
        ppo = self.ppo
        check(ppo.learning_rate > 0, "ppo.learning_rate", "must be > 0")
        check(ppo.num_steps >= 1, "ppo.num_steps", "must be >= 1")
        check(ppo.update_epochs >= 1, "ppo.update_epochs", "must be >= 1")
        check(0 < ppo.gamma <= 1, "ppo.gamma", "must be in (0, 1]")
        check(0 <= ppo.gae_lambda <= 1, "ppo.gae_lambda", "must be in [0, 1]")
        check(ppo.clip_coef > 0, "ppo.clip_coef", "must be > 0")
        check(ppo.max_grad_norm > 0, "ppo.max_grad_norm", "must be > 0")
        batch = ppo.num_steps * self.env.num_envs
        check(
            1 <= ppo.num_minibatches <= batch,
            "ppo.num_minibatches",
            f"must be in [1, num_steps * env.num_envs = {batch}]",
        )
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
        check(self.eval_every >= 0 and self.save_every >= 0, "eval_every/save_every", "must be >= 0")
        check(self.eval_episodes >= 0, "eval_episodes", "must be >= 0")
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
            check(tracker in ("tensorboard",), "report_to", f"unknown tracker {tracker!r}; use ['tensorboard'] or []")
        check(
            self.policy.family in POLICY_FAMILIES,
            "policy.family",
            f"unknown family {self.policy.family!r}; choose one of {sorted(POLICY_FAMILIES)}",
        )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe (or the defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} not found; see the recipes/ folder for examples")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping of sections")
    for override in overrides or []:
        apply_override(data, override)
    cfg = from_dict(TrainConfig, data)
    cfg.validate()
    return cfg


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
