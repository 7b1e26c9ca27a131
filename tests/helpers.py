"""Small helpers shared by tests."""

import importlib.util
import socket
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench_script(name: str):
    """A script of bench/ (not a package) imported as a module, ``name`` without ``.py``."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: for a rendezvous of ranks, so that tests running at once never share one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def read_wandb_history(path: Path) -> list[dict]:
    """The history rows (``run.log`` calls of one step: key -> JSON value, a logged dict as a dict) of an offline
    Weights & Biases run file (``offline-run-*/run-ID.wandb``), read as it is written: LevelDB's log format (32 KiB
    blocks of records, each with a 7-byte header: CRC32, length, type 1 full / 2 first / 3 middle / 4 last) after a
    7-byte file header (``:W&B``, magic 0xBEE1, version 0), every record a ``wandb_internal_pb2.Record`` protobuf.
    wandb no longer ships a Python reader of its own."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), "not a .wandb file"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding at the end
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last: one whole Record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row: dict = {}
                for item in record.history.item:  # a logged dict (a media object) comes as one item per field
                    *outer, key = item.nested_key or [item.key]
                    node = row
                    for name in outer:
                        node = node.setdefault(name, {})
                    node[key] = json.loads(item.value_json)
                rows.append(row)
    return rows
