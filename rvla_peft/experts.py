"""Scripted experts that solve ManiSkill tabletop tasks from privileged state, batched in torch.

    expert = make_expert("PickCube-v1")
    cfg = expert_env_config("PickCube-v1")         # EnvConfig with privileged_state=True, state_keys=expert's
    envs = make_envs(cfg); obs = envs.reset(seed=0)
    action = expert(obs["state"])                   # [N, 7] pd_ee_delta_pose action in [-1, 1]

Experts: PickCube-v1, PushCube-v1, PullCube-v1, StackCube-v1 (measured clean success on seeds 0-99 and 1000-1199:
100%, 100%, 100%, 98% / 96.5%; ``python -m rvla_peft.experts --episodes 100``).

An expert is a pure function of the state: the phase (reach, descend, grasp, carry; or go behind, push) is read
off the state itself rather than kept in a per-env memory, so auto-resets, action noise or a dropped grasp need no
bookkeeping: the expert just picks up from whatever state it sees. ``reset`` exists for the policy-like interface
and does nothing.

The state is ``obs["state"]`` of an env built with ``state_keys = expert.state_keys`` and
``privileged_state=True`` (ManiSkill's "rgb+state_dict" obs mode, which adds the object pose). Its first columns
are the project's default proprio state (``agent.qpos``, ``extra.tcp_pose``), so a policy or a demo can keep those.

Frames: ManiSkill reports poses in the world frame; ``pd_ee_delta_pose`` takes the translation and the rotation
(left-multiplied, XYZ Euler; its sign is inverted in mani_skill 3.0.1, see ``ROT_ACTION_SIGN``) in the robot's base
frame. The experts work in the world frame and rotate the deltas into the base frame with ``base_quat`` (the Panda
base in these tasks sits at (-0.615, 0, 0) with the identity rotation, so the rotation is a no-op there, but it is
not assumed). Quaternions are (w, x, y, z) as in ManiSkill.

``python -m rvla_peft.experts --task PickCube-v1 --episodes 50`` measures an expert's success on state-only envs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from rvla_peft.config import EnvConfig
from rvla_peft.envs.maniskill import _check_task, _import_mani_skill, _make_kwargs, extract_state
from rvla_peft.perturbations.base import ActionPerturbation
from rvla_peft.perturbations.specs import build_perturbations
from rvla_peft.policies.base import ActionSample

PROPRIO_KEYS = ("agent.qpos", "extra.tcp_pose")  # EnvConfig's default state_keys: the columns a policy would see
KEY_WIDTHS = {
    "agent.qpos": 9,
    "extra.tcp_pose": 7,
    "extra.obj_pose": 7,
    "extra.goal_pos": 3,
    "extra.is_grasped": 1,
    "extra.cubeA_pose": 7,
    "extra.cubeB_pose": 7,
}

POS_SCALE = 0.1  # m: pd_ee_delta_pose maps a translation action of 1 to 0.1 m
ROT_SCALE = 0.1  # rad: ... and a rotation action of 1 to 0.1 rad
# mani_skill 3.0.1 scales the rotation action by rot_lower (-0.1), not rot_upper: a rotation action r turns the TCP
# by -0.1 r (haosulab/ManiSkill issue #1469, fix proposed in PR #1472). tests/test_experts.py checks the installed
# controller still does so; flip this when the pinned mani_skill carries the fix.
ROT_ACTION_SIGN = -1.0
GRIPPER_OPEN, GRIPPER_CLOSED = 1.0, -1.0
FINGERS_OPEN = 0.07  # m: sum of the two Panda finger joints above which the gripper counts as open (max 0.08)
FINGERS_EMPTY = 0.01  # m: ... below which it has closed on nothing
DOWN = (0.0, 1.0, 0.0, 0.0)  # the TCP pointing straight down, fingers closing along world y (Panda's start pose)


# --------------------------------------------------------------------------------------------------------------
# Quaternion maths, batched [N, 4] (w, x, y, z)


def quat_mul(a: Tensor, b: Tensor) -> Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ),
        dim=-1,
    )


def quat_conj(q: Tensor) -> Tensor:
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def quat_rotate(q: Tensor, v: Tensor) -> Tensor:
    """Rotate vectors v [N, 3] by unit quaternions q [N, 4]."""
    w, u = q[..., :1], q[..., 1:]
    t = 2.0 * torch.linalg.cross(u, v)
    return v + w * t + torch.linalg.cross(u, t)


def quat_to_rotvec(q: Tensor) -> Tensor:
    """Axis * angle of unit quaternions, angle in [0, pi] (the shorter way round)."""
    q = torch.where(q[..., :1] < 0, -q, q)
    sin_half = q[..., 1:].norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(sin_half, q[..., :1])
    scale = torch.where(sin_half > 1e-8, angle / sin_half.clamp_min(1e-8), torch.full_like(angle, 2.0))
    return q[..., 1:] * scale


def yaw_of(q: Tensor) -> Tensor:
    """Heading of the body x axis in the world xy plane."""
    w, x, y, z = q.unbind(-1)
    return torch.atan2(2.0 * (x * y + w * z), 1.0 - 2.0 * (y * y + z * z))


def yaw_quat(yaw: Tensor) -> Tensor:
    zeros = torch.zeros_like(yaw)
    return torch.stack((torch.cos(yaw / 2), zeros, zeros, torch.sin(yaw / 2)), dim=-1)


def wrap(angle: Tensor, period: float) -> Tensor:
    """Angle into [-period / 2, period / 2)."""
    return torch.remainder(angle + period / 2, period) - period / 2


def down_quat(yaw: Tensor) -> Tensor:
    """The TCP pointing down with its x axis at heading ``yaw``."""
    return quat_mul(yaw_quat(yaw), yaw.new_tensor(DOWN).expand(*yaw.shape, 4))


# --------------------------------------------------------------------------------------------------------------
# From a target pose to a pd_ee_delta_pose action


class Plan(NamedTuple):
    """Where the TCP should go this step (world frame) and what the gripper should do."""

    pos: Tensor  # [N, 3]
    quat: Tensor  # [N, 4]
    gripper: Tensor  # [N]: +1 open, -1 closed


def delta_pose_action(tcp_pose: Tensor, plan: Plan, base_quat: Tensor) -> Tensor:
    """A proportional step towards ``plan`` as a pd_ee_delta_pose action [N, 7] in [-1, 1].

    The translation keeps its direction when it is limited (scaled, not clipped per axis), so a move planned to
    pass above an object does not bend into it. The rotation error goes in as XYZ Euler angles equal to its
    rotation vector, exact to first order (steps are at most 0.1 rad and the loop closes the rest)."""
    to_base = quat_conj(base_quat).expand_as(tcp_pose[:, 3:])
    pos = quat_rotate(to_base, plan.pos - tcp_pose[:, :3]) / POS_SCALE
    pos = pos / pos.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    rot = quat_rotate(to_base, quat_to_rotvec(quat_mul(plan.quat, quat_conj(tcp_pose[:, 3:])))) / ROT_SCALE
    rot = ROT_ACTION_SIGN * rot
    rot = rot / rot.norm(dim=-1, keepdim=True).clamp_min(1.0)
    return torch.cat((pos, rot, plan.gripper.unsqueeze(-1)), dim=-1)


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.unsqueeze(-1) if a.dim() > mask.dim() else mask, a, b)


def _with_z(xy: Tensor, z: Tensor | float) -> Tensor:
    z = torch.as_tensor(z, dtype=xy.dtype, device=xy.device).expand(xy.shape[0])
    return torch.cat((xy[:, :2], z.unsqueeze(-1)), dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Task plans: pure functions of the state


def pick_plan(
    tcp_pose: Tensor, cube_pose: Tensor, goal: Tensor, grasped: Tensor, fingers: Tensor, carry_z: float = 0.06
) -> Plan:
    """Reach above the cube (yaw aligned to a face), descend, close, carry the cube to the goal.

    ``fingers`` is the gripper opening (sum of both finger joints). ``grasped`` (ManiSkill's is_grasped) counts
    only with a closed gripper at the cube: the first observation after a reset can still carry the previous
    episode's contacts. While the cube is far from the goal it is carried at least ``carry_z`` high, so it does not
    drag on the table. A grasp that closes on nothing opens and rises to try again."""
    p, c = tcp_pose[:, :3], cube_pose[:, :3]
    yaw = yaw_of(tcp_pose[:, 3:])
    # The cube looks the same every quarter turn: turn the fingers to the nearest face.
    quat = down_quat(yaw + wrap(yaw_of(cube_pose[:, 3:]) - yaw, math.pi / 2))
    yaw_err = quat_to_rotvec(quat_mul(quat, quat_conj(tcp_pose[:, 3:]))).norm(dim=-1)
    xy_err = (c[:, :2] - p[:, :2]).norm(dim=-1)
    dist = (c - p).norm(dim=-1)
    low = p[:, 2] < c[:, 2] + 0.04
    grasped = (grasped > 0.5) & (fingers < FINGERS_OPEN) & (dist < 0.03)

    empty = ~grasped & (fingers < FINGERS_EMPTY)  # closed on nothing: open again
    closing = ~grasped & ~empty & ((dist < 0.01) | ((fingers < FINGERS_OPEN) & (dist < 0.02)))
    aligned = (xy_err < torch.where(low, 0.02, 0.01)) & (yaw_err < 0.15)  # looser once low: no bobbing
    descend = ~grasped & ~closing & ~empty & aligned

    hover = c + c.new_tensor([0.0, 0.0, 0.06])
    # Rise straight up before moving sideways when low and off target, so the fingers do not sweep the cube.
    reach = torch.where((low & (xy_err > 0.02)).unsqueeze(-1), _with_z(p, hover[:, 2]), hover)
    far = (goal[:, :2] - c[:, :2]).norm(dim=-1) > 0.02
    cube_target = _with_z(goal, torch.where(far, goal[:, 2].clamp_min(carry_z), goal[:, 2]))
    carry = p + cube_target - c  # move the TCP so that the held cube lands on the goal

    pos = _where(grasped, carry, _where(closing, c, _where(descend, c, reach)))
    gripper = torch.where(grasped | closing, GRIPPER_CLOSED, GRIPPER_OPEN).to(p.dtype)
    return Plan(pos, quat, gripper)


def push_plan(tcp_pose: Tensor, cube_pose: Tensor, goal: Tensor, half_size: float = 0.02) -> Plan:
    """Go behind the cube (opposite the goal), lower the closed gripper to the table, push the cube to the goal.

    Serves both PushCube (goal in front, +x) and PullCube (goal towards the robot, -x): "behind" is read off the
    cube-to-goal direction. The approach passes above the cube; a TCP that is low and not behind it rises first.
    The push runs at full speed: a cube near the far edge of PushCube's range ends where the arm is fully
    stretched, and the momentum of a fast push slides it the last centimetres (half speed failed 1 seed in 300)."""
    p, c = tcp_pose[:, :3], cube_pose[:, :3]
    d = goal[:, :2] - c[:, :2]
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    rel = p[:, :2] - c[:, :2]
    along = (rel * d).sum(-1)
    lateral = (rel - along.unsqueeze(-1) * d).norm(dim=-1)
    standoff = half_size + 0.02  # TCP centre to cube centre while pushing: the closed fingers' half depth + a gap
    push_z, hover_z = half_size, 2 * half_size + 0.03

    low = p[:, 2] < push_z + 0.015
    behind = (along < -(half_size + 0.005)) & (lateral < torch.where(low, 0.025, 0.01))
    start = _with_z(c[:, :2] - standoff * d, push_z)
    push = _with_z(goal[:, :2] - standoff * d, push_z)
    above = _with_z(start, hover_z)
    clear = _with_z(p, hover_z)  # straight up
    near = rel.norm(dim=-1) < standoff + 0.04

    pos = _where(behind & low, push, _where(behind, start, _where(low & near, clear, above)))
    quat = down_quat(yaw_of(tcp_pose[:, 3:]))  # keep the heading, correct any tilt
    return Plan(pos, quat, torch.full_like(pos[:, 0], GRIPPER_CLOSED))


def stack_plan(tcp_pose: Tensor, cube_a: Tensor, cube_b: Tensor, fingers: Tensor, half_size: float = 0.02) -> Plan:
    """Pick cube A, carry it above cube B, lower it on top, let go.

    StackCube reports no is_grasped: a gripper closed to about the cube's width at the cube counts as holding it.
    Once A rests on B the gripper opens and the TCP holds still (success needs A released and static)."""
    p, a, b = tcp_pose[:, :3], cube_a[:, :3], cube_b[:, :3]
    held = ((fingers - 2 * half_size).abs() < 0.006) & ((a - p).norm(dim=-1) < 0.02)
    on_top = b + b.new_tensor([0.0, 0.0, 2 * half_size])
    xy_off = (a[:, :2] - b[:, :2]).norm(dim=-1)
    lowering = a[:, 2] < on_top[:, 2] + 0.015
    above = xy_off > torch.where(lowering, 0.015, 0.006)  # hysteresis: no bobbing while lowering
    goal = torch.where(above.unsqueeze(-1), on_top + b.new_tensor([0.0, 0.0, 0.03]), on_top)
    plan = pick_plan(tcp_pose, cube_a, goal, held.to(p.dtype), fingers)
    placed = (xy_off < 0.01) & ((a[:, 2] - on_top[:, 2]).abs() < 0.008)
    return Plan(_where(placed, p, plan.pos), plan.quat, torch.where(placed, GRIPPER_OPEN, plan.gripper).to(p.dtype))


# --------------------------------------------------------------------------------------------------------------
# Experts


class Expert:
    """Privileged state [N, D] -> pd_ee_delta_pose action [N, 7] in [-1, 1]; batched, stateless, any device."""

    task: str = ""
    state_keys: tuple[str, ...] = ()

    def __init__(self, base_quat: Sequence[float] = (1.0, 0.0, 0.0, 0.0)) -> None:
        self.base_quat = tuple(float(v) for v in base_quat)

    @property
    def state_dim(self) -> int:
        return sum(KEY_WIDTHS[k] for k in self.state_keys)

    def split(self, state: Tensor) -> dict[str, Tensor]:
        """The state columns by key (views)."""
        if state.dim() != 2 or state.shape[1] != self.state_dim:
            raise ValueError(
                f"{type(self).__name__} needs state [N, {self.state_dim}] from state_keys {list(self.state_keys)} "
                f"with env.privileged_state=true, got {tuple(state.shape)}"
            )
        return dict(zip(self.state_keys, state.split([KEY_WIDTHS[k] for k in self.state_keys], dim=1), strict=True))

    def plan(self, s: dict[str, Tensor]) -> Plan:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, state: Tensor) -> Tensor:
        s = self.split(state.float())
        action = delta_pose_action(s["extra.tcp_pose"], self.plan(s), state.new_tensor(self.base_quat).float())
        return action.clamp(-1.0, 1.0)

    def reset(self, mask: Tensor | None = None) -> None:
        """Nothing to reset: the expert keeps no per-env memory."""


class PickCubeExpert(Expert):
    task = "PickCube-v1"
    state_keys = (*PROPRIO_KEYS, "extra.obj_pose", "extra.goal_pos", "extra.is_grasped")

    def plan(self, s: dict[str, Tensor]) -> Plan:
        fingers = s["agent.qpos"][:, 7:9].sum(-1)
        return pick_plan(
            s["extra.tcp_pose"], s["extra.obj_pose"], s["extra.goal_pos"], s["extra.is_grasped"][:, 0], fingers
        )


class PushCubeExpert(Expert):
    task = "PushCube-v1"
    state_keys = (*PROPRIO_KEYS, "extra.obj_pose", "extra.goal_pos")

    def plan(self, s: dict[str, Tensor]) -> Plan:
        return push_plan(s["extra.tcp_pose"], s["extra.obj_pose"], s["extra.goal_pos"])


class PullCubeExpert(PushCubeExpert):
    task = "PullCube-v1"


class StackCubeExpert(Expert):
    task = "StackCube-v1"
    state_keys = (*PROPRIO_KEYS, "extra.cubeA_pose", "extra.cubeB_pose")

    def plan(self, s: dict[str, Tensor]) -> Plan:
        fingers = s["agent.qpos"][:, 7:9].sum(-1)
        return stack_plan(s["extra.tcp_pose"], s["extra.cubeA_pose"], s["extra.cubeB_pose"], fingers)


EXPERTS: dict[str, type[Expert]] = {
    cls.task: cls for cls in (PickCubeExpert, PushCubeExpert, PullCubeExpert, StackCubeExpert)
}


def make_expert(task: str, base_quat: Sequence[float] = (1.0, 0.0, 0.0, 0.0)) -> Expert:
    if task not in EXPERTS:
        raise ValueError(f"no scripted expert for task {task!r}; experts exist for {sorted(EXPERTS)}")
    return EXPERTS[task](base_quat)


def expert_env_config(task: str, **overrides: object) -> EnvConfig:
    """An EnvConfig whose obs["state"] is what ``make_expert(task)`` reads."""

    fields = {"task": task, "privileged_state": True, "state_keys": list(make_expert(task).state_keys)}
    return EnvConfig(**{**fields, **overrides})


class ScriptedPolicy:
    """An expert behind the policy contract that ``rollout.run_episodes`` / ``evaluate_success`` use.

    ``act`` returns the expert action as both the policy and the env action and as the mean; log-probs and values
    are zeros (the expert is deterministic and has no critic)."""

    def __init__(self, expert: Expert, device: torch.device | str = "cpu") -> None:
        self.expert = expert
        self.device = torch.device(device)

    @torch.no_grad()
    def act(self, obs: dict, deterministic: bool = True) -> ActionSample:
        action = self.expert(obs["state"].to(self.device))
        zeros = action.new_zeros(action.shape[0])
        return ActionSample(action=action, env_action=action, log_prob=zeros, value=zeros, mean=action)

    def value(self, obs: dict) -> Tensor:
        return torch.zeros(obs["state"].shape[0], device=self.device)

    def eval(self) -> ScriptedPolicy:
        return self

    def train(self, mode: bool = True) -> ScriptedPolicy:
        return self


# --------------------------------------------------------------------------------------------------------------
# Measuring an expert on state-only envs (no rendering: ~10x faster than RGB)


def make_state_env(cfg: EnvConfig):
    """One CPU ManiSkill env like ``make_envs`` builds (same controller, seeding, time limit), without cameras."""
    import gymnasium as gym

    _import_mani_skill()
    _check_task(cfg.task)
    kwargs = _make_kwargs(cfg, 1, "physx_cpu", "cpu")
    kwargs.pop("sensor_configs")
    return gym.make(cfg.task, **{**kwargs, "obs_mode": "state_dict"})


def action_perturbations(specs: Sequence) -> list[ActionPerturbation]:
    """The perturbations of ``specs`` that an expert can meet: it reads the simulator's state, not pixels."""
    built = build_perturbations(list(specs))
    seen = [p.name for p in built if not isinstance(p, ActionPerturbation)]
    if seen:
        raise ValueError(f"{', '.join(seen)}: the expert reads the simulator's state, so only action perturbations "
                         "apply to it (action_noise, action_bias, ...)")  # fmt: skip
    return built


def run_expert(
    task: str, seeds: Sequence[int], max_episode_steps: int = 50, env=None, perturb: Sequence = ()
) -> tuple[list[bool], list[int]]:
    """Success and length of one expert episode per seed, on a state-only env (``env`` to reuse one), with the
    action perturbations ``perturb`` on the executed actions (episode seed s draws them from a generator seeded s)."""

    expert = make_expert(task)
    perturbations = action_perturbations(perturb)
    cfg = expert_env_config(task, max_episode_steps=max_episode_steps)
    own = env is None
    env = make_state_env(cfg) if own else env
    successes, lengths = [], []
    try:
        for seed in seeds:
            raw, _ = env.reset(seed=int(seed))
            generator = torch.Generator().manual_seed(int(seed))
            for p in perturbations:
                p.reset(torch.ones(1, dtype=torch.bool))
            steps, done = 0, False
            while not done:
                action = expert(extract_state(raw, cfg.state_keys, 1))
                for p in perturbations:
                    action = p.apply(action, generator)
                raw, _, terminated, truncated, info = env.step(action)
                steps += 1
                done = bool(terminated[0] | truncated[0]) or steps == max_episode_steps
            successes.append(bool(info["success"][0]))
            lengths.append(steps)
    finally:
        if own:
            env.close()
    return successes, lengths


if __name__ == "__main__":  # the command lives in rvla_peft/cli/experts.py
    import sys

    from rvla_peft.cli.experts import main

    sys.exit(main())
