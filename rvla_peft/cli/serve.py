"""Serve one policy over HTTP: ``rvla-serve --base MODEL --adapter ADAPTER`` (or ``python -m rvla_peft.serve``).

The base plus the adapter (its LoRA folded into the weights: ``policy.merge_lora_to_act``), set up by the adapter's
``recipe.yaml`` as evaluation sets it up, answers OpenVLA's ``POST /act`` with the same actions as in-process
evaluation (:mod:`rvla_peft.serving.app` for the protocol). Concurrent requests share forwards (``--max-batch``,
``--max-wait-ms``). A client::

    from rvla_peft.serving.client import PolicyClient

    action = PolicyClient("http://127.0.0.1:8000").act(image, "push the cube to the goal")
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np

from rvla_peft.adapters import HubError, adapter_recipe, check_base_match, resolve_adapter
from rvla_peft.config import ConfigError, load_config
from rvla_peft.utils.constants import POLICY_SETTINGS_FILE, RECIPE_FILE, REPORT_DIR, REPORT_JSON

TOKEN_ENV = "RVLA_SERVE_TOKEN"
# policy.json keys (written by rvla_peft.pretrain beside a base) -> the recipe keys they set
_TRAINED_SETTINGS = {
    "family": "policy.family",
    "prompt_template": "policy.prompt_template",
    "action_dim": "policy.action_dim",
    "n_bins": "policy.n_bins",
    "action_low": "policy.action_low",
    "action_high": "policy.action_high",
    "image_size": "env.image_size",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rvla-serve",
        description="Serve a VLA policy (base + LoRA adapter) over HTTP: OpenVLA's POST /act, GET /health, "
        "GET /metadata.",
    )
    parser.add_argument("--base", help="base model: Hub id, local folder or builtin:NAME (default: the recipe's)")
    parser.add_argument("--adapter", help="adapter folder, Hub id or builtin:NAME (default: the bare base)")
    parser.add_argument("--recipe", help="recipe giving the policy settings (default: the adapter's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed at start)")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests answered by one forward")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="how long a batch waits for more requests after its first; 0: it takes what queued during the "
        "previous forward and waits for nothing",
    )
    parser.add_argument(
        "--image-size", type=int, help="image side the clients send (default: the recipe's env.image_size)"
    )
    parser.add_argument(
        "--token", help=f"require 'Authorization: Bearer TOKEN' on /act and /metadata (default: ${TOKEN_ENV})"
    )
    parser.add_argument("--max-body-bytes", type=int, default=16 * 2**20, help="largest request body accepted")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--allow-base-mismatch", action="store_true", help="serve an adapter whose recorded base differs"
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. policy.merge_lora_to_act=false")
    return parser.parse_intermixed_args(argv)


def trained_settings_overrides(name_or_path: str | None) -> list[str]:
    """Overrides from the ``policy.json`` beside a base made by ``rvla_peft.pretrain`` (the settings it decodes
    with), for a base served without a recipe."""
    if not name_or_path:
        return []
    from rvla_peft.models.tiny import resolve_builtin

    try:
        settings = Path(resolve_builtin(name_or_path)) / POLICY_SETTINGS_FILE
    except (ValueError, FileNotFoundError):
        return []
    if not settings.is_file():
        return []
    trained = json.loads(settings.read_text())
    return [f"{key}={json.dumps(trained[name])}" for name, key in _TRAINED_SETTINGS.items() if name in trained]


def robustness_of(adapter_dir: Path, adapter: str) -> dict | None:
    """The adapter's robustness results, as its model card shows them, from the report beside it (a pushed repo,
    a packaged adapter) or in its run folder (OUTPUT/report); None without one."""
    from rvla_peft.hub.card import robustness_table, select_policy

    for path in (adapter_dir / REPORT_JSON, adapter_dir.parent / REPORT_DIR / REPORT_JSON):
        if path.is_file():
            report = json.loads(path.read_text())
            try:
                policy = select_policy(report, adapter_dir, repo_id=adapter)
            except HubError:
                return None
            return {
                "policy": policy,
                "task": report.get("task"),
                "episodes": report.get("episodes"),
                "summary": report.get("summary", {}).get(policy),
                "results": [r for r in report.get("results", []) if r["policy"] == policy],
                "table": robustness_table(report, policy),
            }
    return None


def load_config_for(args):
    """The recipe config (the adapter's, or ``--recipe``, or the base's trained settings) and the adapter folder."""
    local = resolve_adapter(args.adapter) if args.adapter else None
    recipe = args.recipe
    if recipe is None and local is not None:
        with contextlib.suppress(HubError):
            recipe = adapter_recipe(local)
    if recipe is None and args.base and (Path(args.base) / RECIPE_FILE).is_file():
        recipe = Path(args.base) / RECIPE_FILE  # a merged export carries its recipe
    overrides = [] if recipe is not None else trained_settings_overrides(args.base)
    overrides += list(args.overrides)
    if args.base:
        overrides.append(f"model.name_or_path={args.base}")
    cfg = load_config(recipe, overrides)
    return cfg, local


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one) for uvicorn to serve on."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it every reply on a
    # kept-alive connection waited ~40 ms for the delayed ACK of its previous segment
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        if args.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
        if args.max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
        if args.max_body_bytes < 1024:
            raise ValueError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
        cfg, local = load_config_for(args)
        from rvla_peft.policies.registry import base_model_id

        if local is not None:
            allow = args.allow_base_mismatch
            check_base_match(local, base_model_id(cfg.model), allow=allow, adapter_name=args.adapter)
        sock = listen(args.host, args.port)  # before any model loads: a port in use fails in a second
    except (ConfigError, ValueError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with sock:
        return serve(args, cfg, local, sock, token)


def serve(args, cfg, local: Path | None, sock: socket.socket, token: str | None) -> int:
    import torch
    import uvicorn

    from rvla_peft.envs.maniskill import resolve_instruction
    from rvla_peft.policies.registry import base_model_id, build_policy
    from rvla_peft.serving.app import create_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = build_policy(cfg, adapter=local, device=device).eval()
    size = args.image_size or cfg.env.image_size
    with contextlib.ExitStack() as stack:
        if local is None:
            # the bare base: its fresh LoRA (B = 0) changes no output bit and only costs time, as in evaluation
            stack.enter_context(policy.peft_model.disable_adapter())
        stack.enter_context(policy.acting())  # the LoRA folded into the weights (policy.merge_lora_to_act)
        instruction = cfg.env.instruction or _default_instruction(cfg, resolve_instruction)
        warmup = policy.predict_action(np.zeros((size, size, 3), np.uint8), instruction)  # first-call costs
        metadata = {
            "family": cfg.policy.family,
            "base": base_model_id(cfg.model),
            "adapter": args.adapter,
            "task": cfg.env.task,
            "instruction": instruction,
            "image_size": [size, size],
            "model_image_size": list(policy.image_hw),
            "action_shape": list(warmup.shape),
            "action_dtype": str(warmup.dtype),
            "chunk_size": int(warmup.shape[0]) if warmup.ndim == 2 else 1,
            "action_dim": int(warmup.shape[-1]),
            "control_mode": cfg.env.control_mode,
            "unnorm_key": getattr(cfg.policy, "unnorm_key", None),
            "uses_state": bool(getattr(cfg.policy, "use_state", False)),
            "lora_merged": bool(local is not None and cfg.policy.merge_lora_to_act),
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "robustness": robustness_of(local, args.adapter) if local is not None else None,
        }
        app = create_app(
            policy,
            metadata,
            (size, size),
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            token=token,
            max_body_bytes=args.max_body_bytes,
        )
        host, port = sock.getsockname()[:2]
        print(
            f"rvla-serve: {cfg.policy.family} policy ({metadata['base']}"
            f"{' + ' + args.adapter if args.adapter else ''}) on http://{host}:{port}",
            flush=True,
        )
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_keep_alive=30))
        server.run(sockets=[sock])
    return 0


def _default_instruction(cfg, resolve_instruction) -> str:
    try:
        return resolve_instruction(cfg.env)
    except ValueError:
        return "do the task"


if __name__ == "__main__":
    sys.exit(main())
