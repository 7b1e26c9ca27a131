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
import os
import socket
import sys
from pathlib import Path

from rvla_peft.adapters import HubError, check_base_match
from rvla_peft.config import ConfigError
from rvla_peft.serving.policy import serve_config

TOKEN_ENV = "RVLA_SERVE_TOKEN"


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
        cfg, local = serve_config(args.base, args.adapter, args.recipe, args.overrides)
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

    from rvla_peft.policies.registry import build_policy
    from rvla_peft.serving.app import create_app
    from rvla_peft.serving.policy import served_metadata

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = build_policy(cfg, adapter=local, device=device).eval()
    size = args.image_size or cfg.env.image_size
    with contextlib.ExitStack() as stack:
        if local is None:
            # the bare base: its fresh LoRA (B = 0) changes no output bit and only costs time, as in evaluation
            stack.enter_context(policy.peft_model.disable_adapter())
        stack.enter_context(policy.acting())  # the LoRA folded into the weights (policy.merge_lora_to_act)
        metadata = served_metadata(
            policy,
            cfg,
            adapter=args.adapter,
            adapter_dir=local,
            image_size=size,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
        )
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


if __name__ == "__main__":
    sys.exit(main())
