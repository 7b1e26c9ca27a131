"""The ``pi0`` policy family: PPO over the denoising chain of a flow-matching VLA (transformers' ``PI0``).

pi0 predicts a chunk of H actions by integrating a learned velocity field from Gaussian noise (t = 1) to actions
(t = 0) in K Euler steps, ``x_{t-dt} = x_t - dt * v(x_t, t)``. That chain is deterministic given its start, so it
has no log-prob. Following flow-SDE (Flow-GRPO; piRL / RLinf for pi0), each Euler step becomes a Gaussian
transition with the same marginals as the ODE:

    mean = x_t - dt * v - sigma_t^2 * dt / (2 t) * (x_t + (1 - t) * v)      sigma_t = a * sqrt(t / (1 - t))
    std  = sqrt(dt) * sigma_t

(``x_t + (1 - t) v`` is the predicted noise, ``a`` is ``policy.noise_level``; ``1 - t`` is floored at ``dt`` so that
the first step, t = 1, stays finite, as RLinf does). The policy's action is the whole chain x_0 .. x_K; its log-prob
(``policy.likelihood``) is the sum of the K Gaussian step log-probs, their mean, or, by default, as RLinf, the one
step a chain noises (the others follow the ODE; the step is drawn from the chain's x_0, so the update finds it in the
stored chain). x_0 ~ N(0, I) does not depend on the weights and is left out.

Only the dimensions the env executes are noised: the first ``execute_steps`` rows of the chunk and the first
``action_dim`` columns of pi0's ``max_action_dim``. The other entries follow the plain ODE step (sigma = 0), so the
log-prob and the entropy are sums over the executed block only (given the recorded chain: how a weight change moves
the noiseless entries is not in the ratio). Noising dimensions that never reach the env would add hundreds of
reward-free terms to every PPO ratio (RLinf slices them off for the same reason).

The regularisers need a mean action mu(o) that is a smooth function of the image: ``mean`` is the chunk denoised
by the plain ODE from a fixed start x_0 = 0 (the mode of the noise prior; nothing to store, the same on every
device), executed block only, not clipped. It is what deterministic ``act`` executes.

Cost: one prefix pass (image + prompt through PaliGemma, kept as a KV cache) and K action-expert passes per call;
the fixed-noise ODE and the sampled (or given) chain share each expert pass as a batch of 2N.

Prompt: ``policy.prompt_template`` (pi0 reads the bare task text: set it to ``"{instruction}"``, as
``recipes/pi0_maniskill.yaml`` does). Observations: the image and the instruction; with ``policy.use_state`` also
``obs["state"]`` (zero-padded to ``max_state_dim``), else a zero state. The rollout buffer keeps images and
instructions only, so training with the state needs a rollout that stores it: the default feeds zeros in ``act``
and ``evaluate`` alike.

``builtin:tiny-pi0`` (``rvla_peft.models.tiny``) is a random PI0 of the same architecture, small enough for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rvla_peft.policies.base import ActionSample, MemoryHooks, Observation, Policy, PolicyOutput
from rvla_peft.policies.common import (
    blank_image,
    bounds_tensor,
    gripper_from_env,
    gripper_to_env,
    masked_mean,
    normalize_actions,
    unnormalize_actions,
)
from rvla_peft.policies.distributions import gaussian_entropy, gaussian_log_prob

# ----------------------------------------------------------------------------------------------------------------
# flow-SDE maths: pure functions on tensors, checked exactly by the tests


def flow_timesteps(num_steps: int) -> Tensor:
    """t_0 = 1 (noise) > t_1 > ... > t_K = 0 (actions), evenly spaced as in pi0's sampler. float64 [K+1]."""
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def flow_sde_sigma(t: float, dt: float, noise_level: float) -> float:
    """Diffusion coefficient a * sqrt(t / (1 - t)); 1 - t floored at dt, so the first step (t = 1) stays finite."""
    return noise_level * math.sqrt(t / max(1.0 - t, dt))


def flow_sde_step(x: Tensor, velocity: Tensor, t: float, dt: float, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
    """Mean and std of the Gaussian transition x_t -> x_{t-dt}.

    The Euler step of the ODE plus the drift that keeps its marginals when noise of std sqrt(dt) * sigma is added:
    ``- sigma^2 dt / (2 t) * eps_hat`` with eps_hat = x + (1 - t) v the predicted noise (for x_t = (1 - t) a + t eps,
    the score is -eps_hat / t). sigma = 0 gives the plain Euler step with std 0; ``sigma`` broadcasts against x.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    predicted_noise = x + (1 - t) * velocity
    mean = x - dt * velocity - sigma**2 * dt / (2 * t) * predicted_noise
    return mean, math.sqrt(dt) * sigma.expand_as(mean)


def noisy_step(x0: Tensor, num_steps: int) -> Tensor:
    """For ``policy.likelihood=one_step``: the denoising step [B] that each chain noises, drawn from the chain's own
    start x_0 (its float32 bits, summed, modulo K): random as x_0 is, independent of the weights, and found again
    from the stored chain when the update recomputes the log-prob."""
    bits = x0.detach().float().contiguous().flatten(1).view(torch.int32).long()
    return bits.sum(1).remainder(num_steps)


def chain_log_prob(step_log_probs: Tensor, noised: Tensor, likelihood: str) -> Tensor:
    """The action's log-prob from its per-step Gaussian terms [B, K] (0 where a step adds no noise): their sum, their
    mean over the K steps, or (one_step) the one noised step's term."""
    total = (step_log_probs * noised).sum(1)
    return total / step_log_probs.shape[1] if likelihood == "mean" else total


def flow_matching_inputs(actions: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The noisy chunk x_t = t * noise + (1 - t) * actions and the target velocity u = noise - actions (openpi's and
    LeRobot's convention, the one this family's sampler integrates from t = 1 to 0); ``t`` [B]."""
    t = t.to(actions.dtype).reshape(-1, *([1] * (actions.dim() - 1)))
    return t * noise + (1 - t) * actions, noise - actions


def flow_matching_loss(velocity: Tensor, target: Tensor, mask: Tensor | None, action_dim: int) -> Tensor:
    """pi0's training loss: the mean squared error between predicted and target velocity [B, H, D], over the first
    ``action_dim`` columns (the rest is padding to ``max_action_dim``) and the steps whose ``mask`` [B, H] is true
    (LeRobot drops padded dimensions and steps past the episode's end the same way)."""
    return masked_mean((velocity.float() - target.float())[..., :action_dim].square(), mask)


def sample_flow_time(
    batch: int,
    generator: torch.Generator | None,
    alpha: float = 1.5,
    beta: float = 1.0,
    scale: float = 0.999,
    offset: float = 0.001,
) -> Tensor:
    """Training times t = Beta(alpha, beta) * scale + offset, as openpi (Beta(1.5, 1) * 0.999 + 0.001). Beta(alpha, 1)
    is drawn by inverting its CDF t^alpha, so that ``generator`` alone decides it. float32 [B]."""
    if beta == 1.0:
        draw = torch.rand(batch, generator=generator, dtype=torch.float64) ** (1.0 / alpha)
    else:  # torch's Beta takes no generator: seed the global RNG from it, inside a fork
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            draw = torch.distributions.Beta(float(alpha), float(beta)).sample((batch,)).double()
    return (draw * scale + offset).float()


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Prefix:
    """Image + prompt through the VLM once: its KV cache (reused by every denoising step) and what reads it."""

    cache: object  # transformers Cache holding the prefix keys / values
    mask: Tensor  # [B, L] attention mask of the prefix (prompts right-padded)
    pooled: Tensor  # [B, hidden] mean of the VLM's last hidden states over the prefix: the value head's input
    state: Tensor  # [B, max_state_dim] in the model dtype


@dataclass
class _Chains:
    mean: Tensor  # [B, k, A] the fixed-noise ODE's executed block (float32)
    chain: Tensor  # [B, K+1, H, D] float32: the SDE chain, or the ODE's when only the ODE ran
    log_prob: Tensor | None  # [B] (None: ODE only)
    entropy: Tensor | None  # [B]


class Pi0MemoryHooks(MemoryHooks):
    """A prefix pass (image + prompt, cached) and K action-expert passes; the whole chain is the stored action."""

    autoregressive = False
    tokenizer_in_checkpoint = False  # pi0 checkpoints ship without a processor (model.processor_name_or_path)

    def decoder_extra_tokens(self, policy_cfg) -> int:
        return 0  # the action chunk goes through the action expert, not the VLM

    def denoise_steps(self, policy_cfg, model_config) -> int:
        return policy_cfg.num_denoise_steps or model_config.num_inference_steps

    def rollout_action_bytes(self, policy_cfg, model_config) -> int:
        chain = self.denoise_steps(policy_cfg, model_config) + 1
        return chain * model_config.chunk_size * model_config.max_action_dim * 4  # float32


class Pi0Policy(Policy):
    """pi0 with LoRA as a PPO policy over its denoising chain (module docstring for the maths and conventions).

    ``act`` returns ``action`` = the chain [N, K+1, H, max_action_dim] (float32), ``env_action`` = its executed
    block [N, k, action_dim] clipped to [-1, 1] and un-normalised with ``policy.action_low/high``, and ``mean`` =
    the fixed-noise ODE's block [N, k, action_dim]."""

    memory_hooks = Pi0MemoryHooks()
    padding_side = "right"  # as pi0's processor pads: the prefix attends bidirectionally, real positions unchanged

    def __init__(self, peft_model, processor, policy_cfg, hidden_size: int):
        super().__init__(peft_model, processor, policy_cfg, hidden_size)  # hidden: PaliGemma's text width
        config = self.model.config
        self.chunk_size, self.max_action_dim = config.chunk_size, config.max_action_dim
        self.max_state_dim = config.max_state_dim
        self.num_steps = policy_cfg.num_denoise_steps or config.num_inference_steps
        self.execute_steps = policy_cfg.execute_steps or self.chunk_size
        self.action_dim = policy_cfg.action_dim
        if not 1 <= self.execute_steps <= self.chunk_size:
            raise ValueError(f"policy.execute_steps={self.execute_steps} must be in [1, chunk_size={self.chunk_size}]")
        if self.action_dim > self.max_action_dim:
            raise ValueError(f"policy.action_dim={self.action_dim} exceeds the model's max_action_dim")
        vision = config.vlm_config.vision_config
        image_processor = getattr(processor, "image_processor", None)
        mean = getattr(image_processor, "image_mean", None) or [0.5] * 3
        std = getattr(image_processor, "image_std", None) or [0.5] * 3
        self.set_image_normalization(
            (vision.image_size, vision.image_size),
            torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
            float(getattr(image_processor, "rescale_factor", 1 / 255)),
        )
        self.register_buffer("action_low", bounds_tensor(policy_cfg.action_low), persistent=False)
        self.register_buffer("action_high", bounds_tensor(policy_cfg.action_high), persistent=False)

    @property
    def model(self):
        """The PI0ForConditionalGeneration inside the PeftModel (its Linear layers carry the LoRA weights)."""
        return self.peft_model.get_base_model()

    # ------------------------------------------------------------------------------------------------------------
    # inputs

    def build_prompt(self, instruction: str) -> Tensor:
        """Prompt ids for one instruction, image placeholders expanded by the processor (pi0 and PaliGemma
        processors write ``<image> * n + <bos> + text + "\\n"``)."""
        text = self.cfg.prompt_template.format(instruction=instruction.strip().replace("\n", " "))
        enc = self.processor(images=blank_image(self.image_hw), text=text, padding=False, return_tensors="pt")
        ids = enc["input_ids"][0]
        return ids[enc["attention_mask"][0].bool()] if "attention_mask" in enc else ids

    def _state(self, obs: Observation, batch: int) -> Tensor:
        if not self.cfg.use_state:
            return torch.zeros(batch, self.max_state_dim, device=self.device, dtype=self.model_dtype)
        if "state" not in obs:
            raise ValueError(
                "policy.use_state=true but the observation has no 'state' (the rollout buffer keeps rgb and "
                "instruction only); train with use_state=false"
            )
        state = obs["state"].to(self.device, torch.float32)[:, : self.max_state_dim]
        return F.pad(state, (0, self.max_state_dim - state.shape[1])).to(self.model_dtype)

    def _env_action(self, block: Tensor) -> Tensor:
        """Executed block [B, k, A] clipped to [-1, 1] -> env action, un-normalised as the action-token family does
        (q01 / q99 to [-1, 1]) when ``policy.action_low/high`` are set, else as is."""
        env_action = unnormalize_actions(block.clamp(-1, 1), self.action_low, self.action_high)
        return gripper_to_env(env_action, self.cfg.gripper)

    # ------------------------------------------------------------------------------------------------------------
    # forward passes

    def _prefix(self, obs: Observation, pixel_values: Tensor | None = None) -> _Prefix:
        """Image + prompt through PaliGemma once, with a KV cache (what pi0's ``sample_actions`` does)."""
        pi0 = self.model.model
        ids, mask = self.encode_prompts(obs["instruction"])
        pixels = self.observation_inputs(obs) if pixel_values is None else pixel_values
        batch = ids.shape[0]
        one_camera = torch.ones(batch, 1, dtype=torch.bool, device=self.device)
        embeds = pi0.embed_prefix(ids, pixels.to(self.model_dtype)[:, None], one_camera)
        out = pi0.vlm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=mask.cumsum(-1) - 1,
            token_type_ids=torch.zeros_like(ids),
            use_cache=True,
        )
        weights = mask.to(out.last_hidden_state.dtype)[..., None]
        pooled = (out.last_hidden_state * weights).sum(1) / weights.sum(1)
        return _Prefix(cache=out.cache, mask=mask, pooled=pooled, state=self._state(obs, batch))

    def _velocity(self, prefix: _Prefix, x: Tensor, t: float | Tensor) -> Tensor:
        """v(x, t) from the action expert over the cached prefix; float32 [B, H, D]. The expert's keys are cropped
        from the cache afterwards, so every step attends to the prefix only."""
        prefix_length = prefix.cache.get_seq_length()
        out = self.model(
            state=prefix.state,
            noise=x.to(self.model_dtype),
            timestep=(
                t.to(self.device, torch.float32)
                if isinstance(t, Tensor)
                else torch.full((x.shape[0],), t, dtype=torch.float32, device=self.device)
            ),
            attention_mask=prefix.mask,
            cache=prefix.cache,
        )
        prefix.cache.crop(prefix_length - prefix.cache.get_seq_length())
        return out.logits.float()

    def _noise_sigma(self, t: float, dt: float) -> Tensor:
        """sigma_t on the executed block [k, A] of the chunk, 0 elsewhere: [H, D] float32."""
        sigma = torch.zeros(self.chunk_size, self.max_action_dim, device=self.device)
        sigma[: self.execute_steps, : self.action_dim] = flow_sde_sigma(t, dt, self.cfg.noise_level)
        return sigma

    def _run(self, prefix: _Prefix, chain: Tensor | None = None, sample: bool = False) -> _Chains:
        """The K denoising steps. Lane 0 is the ODE from x_0 = 0 (-> ``mean``). Lane 1, when ``chain`` is given or
        ``sample``, is the SDE chain: ``chain``'s log-prob recomputed, or a new chain sampled from x_0 ~ N(0, I).
        Both lanes go through each expert pass together, a batch of 2N against the prefix cache repeated."""
        batch, k, a = prefix.mask.shape[0], self.execute_steps, self.action_dim
        shape = (batch, self.chunk_size, self.max_action_dim)
        block = (slice(None), slice(0, k), slice(0, a))
        times = flow_timesteps(self.num_steps).tolist()
        x_ode = torch.zeros(shape, device=self.device)
        if chain is None and not sample:
            ode_steps = [x_ode]
            for i in range(self.num_steps):
                x_ode = x_ode - (times[i] - times[i + 1]) * self._velocity(prefix, x_ode, times[i])
                ode_steps.append(x_ode)
            return _Chains(mean=x_ode[block], chain=torch.stack(ode_steps, 1), log_prob=None, entropy=None)

        if chain is not None and chain.shape[1:] != (self.num_steps + 1, *shape[1:]):
            raise ValueError(f"chain of shape {tuple(chain.shape)}; expected [B, {self.num_steps + 1}, *{shape[1:]}]")
        lanes = _Prefix(
            cache=prefix.cache,
            mask=prefix.mask.repeat_interleave(2, 0),
            pooled=prefix.pooled,
            state=prefix.state.repeat_interleave(2, 0),
        )
        lanes.cache.batch_repeat_interleave(2)  # rows 2n and 2n+1 are sample n's ODE and SDE lanes
        x = chain[:, 0].float() if chain is not None else torch.randn(shape, device=self.device)
        likelihood = self.cfg.likelihood
        steps = torch.arange(self.num_steps, device=self.device)
        if likelihood == "one_step":  # [B, K]: the one step each chain noises
            noised = (steps[None] == noisy_step(x, self.num_steps).to(self.device)[:, None]).float()
        else:
            noised = torch.ones(batch, self.num_steps, device=self.device)
        chain_steps, log_probs, entropies = [x], [], []
        for i in range(self.num_steps):
            t, dt = times[i], times[i] - times[i + 1]
            both = self._velocity(lanes, torch.stack([x_ode, x], 1).flatten(0, 1), t)
            v_ode, v = both.unflatten(0, (batch, 2)).unbind(1)
            x_ode = x_ode - dt * v_ode
            sigma = self._noise_sigma(t, dt)
            mean, std = flow_sde_step(x, v, t, dt, sigma * noised[:, i, None, None])
            if chain is not None:
                x_next = chain[:, i + 1].float()
            else:
                x_next = mean + std * torch.randn(shape, device=self.device)
            # the step's terms as if it were noised (sigma > 0 on the executed block); kept where it is
            log_std = (math.sqrt(dt) * sigma[block[1:]]).log().expand_as(mean[block])
            log_probs.append(gaussian_log_prob(x_next[block], mean[block], log_std).sum((1, 2)))
            entropies.append(gaussian_entropy(log_std).sum((1, 2)))
            x = x_next
            chain_steps.append(x)
        log_prob = chain_log_prob(torch.stack(log_probs, 1), noised, likelihood)
        entropy = chain_log_prob(torch.stack(entropies, 1), noised, likelihood)
        return _Chains(mean=x_ode[block], chain=torch.stack(chain_steps, 1), log_prob=log_prob, entropy=entropy)

    @torch.no_grad()
    def act(self, obs: Observation, deterministic: bool = False) -> ActionSample:
        prefix = self._prefix(obs)
        value = self.value_head(prefix.pooled)
        out = self._run(prefix, sample=not deterministic)
        # deterministic: the fixed-noise ODE chain executes; without noise it has no log-prob (0 here)
        last = out.chain[:, -1, : self.execute_steps, : self.action_dim]
        return ActionSample(
            action=out.chain,
            env_action=self._env_action(last),
            log_prob=out.log_prob if out.log_prob is not None else torch.zeros_like(value),
            value=value,
            mean=out.mean,
        )

    def evaluate(self, obs: Observation, action: Tensor, pixel_values: Tensor | None = None) -> PolicyOutput:
        prefix = self._prefix(obs, pixel_values)
        value = self.value_head(prefix.pooled)
        out = self._run(prefix, chain=action.to(self.device))
        return PolicyOutput(log_prob=out.log_prob, entropy=out.entropy, value=value, mean=out.mean)

    @property
    def action_horizon(self) -> int:
        return self.chunk_size

    def supervised_loss(self, obs: Observation, actions: Tensor, mask=None, generator=None) -> Tensor:
        """Flow matching as openpi and LeRobot train pi0: the expert's next ``chunk_size`` actions (normalised with
        the policy's statistics, clipped to [-1, 1], zero-padded to ``max_action_dim``), noise ~ N(0, I) and
        t ~ Beta(1.5, 1) * 0.999 + 0.001 (the checkpoint's ``time_sampling_*``) from ``generator``, and the MSE
        between the action expert's velocity at (x_t, t) and u = noise - actions."""
        batch, config = actions.shape[0], self.model.config
        chunk = gripper_from_env(actions[:, : self.chunk_size].to(self.device, torch.float32), self.cfg.gripper)
        target = torch.zeros(batch, self.chunk_size, self.max_action_dim, device=self.device)
        target[..., : chunk.shape[-1]] = normalize_actions(chunk, self.action_low, self.action_high).clamp(-1, 1)
        noise = torch.randn(target.shape, generator=generator).to(self.device)
        t = sample_flow_time(
            batch, generator, config.time_sampling_beta_alpha, config.time_sampling_beta_beta,
            config.time_sampling_scale, config.time_sampling_offset,
        ).to(self.device)  # fmt: skip
        x_t, u = flow_matching_inputs(target, noise, t)
        velocity = self._velocity(self._prefix(obs), x_t, t)
        step_mask = None if mask is None else mask[:, : self.chunk_size].to(self.device)
        return flow_matching_loss(velocity, u, step_mask, self.action_dim)

    @torch.no_grad()
    def value(self, obs: Observation) -> Tensor:
        return self.value_head(self._prefix(obs).pooled)

    def visual_embedding_module(self) -> torch.nn.Module:
        """PaliGemma's projector: its output is the image embeddings placed in the prefix."""
        return self.model.model.vlm.multi_modal_projector
