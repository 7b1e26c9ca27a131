"""Small helpers shared by tests."""

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench_script(name: str):
    """A script of bench/ (not a package) imported as a module, ``name`` without ``.py``."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixed_obs(batch: int = 3, size: int = 64, seed: int = 0, instructions=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    return {"rgb": rgb, "instruction": instructions or ["pick up the red cube and move it to the goal"] * batch}


class Recording:
    """Passes every call to a real VecEnv and keeps the actions it executed and the Steps it returned."""

    def __init__(self, env):
        self.env, self.steps, self.actions = env, [], []
        self.num_envs, self.device, self.instructions = env.num_envs, env.device, env.instructions
        self.action_dim = env.action_dim

    def reset(self, seed=None, rebuild=False):
        return self.env.reset(seed=seed, rebuild=rebuild)

    def step(self, action):
        self.actions.append(action.clone())
        self.steps.append(self.env.step(action))
        return self.steps[-1]

    def close(self):
        self.env.close()
