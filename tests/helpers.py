"""Small helpers shared by tests."""

import torch


def fixed_obs(batch: int = 3, size: int = 64, seed: int = 0, instructions=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    return {"rgb": rgb, "instruction": instructions or ["pick up the red cube and move it to the goal"] * batch}
