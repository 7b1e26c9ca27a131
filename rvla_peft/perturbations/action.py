"""Action perturbations: they change the action the env executes, never what the rollout stores as the policy's."""

from __future__ import annotations

import torch

from rvla_peft.perturbations.base import (
    GRIPPER,
    ActionPerturbation,
    Params,
    Resample,
    _History,
    _rand,
    _with_arm,
    register,
)

# --------------------------------------------------------------------------------------------------------------
# Action perturbations


@register
class ActionNoise(ActionPerturbation):
    """Additive zero-mean Gaussian noise on the executed action, then clamped to [-1, 1].

    Standard deviation = 0.3 x severity, so severities 1/3, 2/3 and 1 give the RobustVLA paper's sigma 0.1, 0.2
    and 0.3 (in the env's normalised action space).

    resample "step": actuator noise is new at every command.
    """

    name = "action_noise"
    resample = "step"
    max_std = 0.3

    def draw(self, action: torch.Tensor, generator: torch.Generator) -> Params:
        noise = torch.randn(action.shape, generator=generator, device=action.device, dtype=action.dtype)
        return {"noise": noise}

    def transform(self, action: torch.Tensor, params: Params) -> torch.Tensor:
        return (action + params["noise"] * (self.max_std * self.severity)).clamp_(-1.0, 1.0)


@register
class ActionBias(ActionPerturbation):
    """A constant offset on the arm's action dims for the whole episode (a miscalibrated controller).

    Per env and episode, each arm dim's offset is uniform in [-0.2, 0.2] x severity (normalised action units); the
    gripper command is left alone. Clamped to [-1, 1].

    resample "episode": a calibration error persists.
    """

    name = "action_bias"
    resample = "episode"
    max_offset = 0.2

    def draw(self, action: torch.Tensor, generator: torch.Generator) -> Params:
        return {"offset": 2 * _rand((action.shape[0], action.shape[1] - 1), generator, action) - 1}

    def transform(self, action: torch.Tensor, params: Params) -> torch.Tensor:
        return _with_arm(action, action[:, :GRIPPER] + params["offset"] * (self.max_offset * self.severity))


@register
class ActionGain(ActionPerturbation):
    """A multiplicative gain error on the arm's action dims for the whole episode (wrong controller gains).

    Per env and episode, each arm dim's gain is uniform in [1 - 0.5 x severity, 1 + 0.5 x severity]; the gripper
    command is left alone. Clamped to [-1, 1].

    resample "episode": wrong controller gains persist.
    """

    name = "action_gain"
    resample = "episode"
    max_error = 0.5

    def draw(self, action: torch.Tensor, generator: torch.Generator) -> Params:
        return {"error": 2 * _rand((action.shape[0], action.shape[1] - 1), generator, action) - 1}

    def transform(self, action: torch.Tensor, params: Params) -> torch.Tensor:
        return _with_arm(action, action[:, :GRIPPER] * (1 + params["error"] * (self.max_error * self.severity)))


@register
class ActionDelay(ActionPerturbation):
    """Actuation delay: the env executes the action from k = round(severity x 5) steps ago (250 ms at 20 Hz).

    Early in an episode, the episode's first action (there is no older command to execute).

    resample "episode": the delay is a property of the actuation pipeline (no random draws, so the mode changes
    nothing).
    """

    name = "action_delay"
    resample = "episode"
    max_steps = 5

    def __init__(self, severity: float, resample: Resample | None = None) -> None:
        super().__init__(severity, resample)
        self._actions = _History(self.max_steps)

    def steps(self) -> int:
        return round(self.severity * self.max_steps)

    def reset(self, done: torch.Tensor) -> None:
        super().reset(done)
        self._actions.reset(done)

    def draw(self, action: torch.Tensor, generator: torch.Generator) -> Params:
        return {}

    def apply(self, action: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = self._actions.delayed(action, self.steps())
        self._actions.push(action)
        return out


@register
class ActionDropout(ActionPerturbation):
    """Lost commands: with probability 50% x severity per env and step, the arm's action is zeroed.

    A zero delta pose holds the arm still. The gripper keeps the policy's command: zero there would mean "half
    closed" rather than "no change", and a lost packet should not open or close the hand.

    resample "step": packets are lost one by one.
    """

    name = "action_dropout"
    resample = "step"
    max_rate = 0.5

    def draw(self, action: torch.Tensor, generator: torch.Generator) -> Params:
        return {"u": _rand((action.shape[0],), generator, action)}

    def transform(self, action: torch.Tensor, params: Params) -> torch.Tensor:
        drop = (params["u"] < self.max_rate * self.severity)[:, None]
        return _with_arm(action, action[:, :GRIPPER].masked_fill(drop, 0.0))


@register
class GripperFlip(ActionPerturbation):
    """A wrong gripper command: with probability 25% x severity per env and step, its sign is flipped.

    Open becomes close and vice versa; the arm dims are left alone.

    resample "step": a corrupted command is a one-off.
    """

    name = "gripper_flip"
    resample = "step"
    max_rate = 0.25

    def draw(self, action: torch.Tensor, generator: torch.Generator) -> Params:
        return {"u": _rand((action.shape[0],), generator, action)}

    def transform(self, action: torch.Tensor, params: Params) -> torch.Tensor:
        flip = params["u"] < self.max_rate * self.severity
        gripper = action[:, GRIPPER:]
        return torch.cat([action[:, :GRIPPER], torch.where(flip[:, None], -gripper, gripper)], dim=1)
