"""The policy server's ASGI app (Starlette; ``rvla-serve`` runs it with uvicorn).

- ``POST /act``: OpenVLA's contract (``vla-scripts/deploy.py``): a JSON body ``{"image": uint8 [H, W, 3],
  "instruction": str, "unnorm_key": str?}`` with the image in json-numpy (:mod:`rvla_peft.serving.json_numpy`;
  OpenVLA's ``{"encoded": "<that JSON as a string>"}`` wrapper too), answered with
  ``{"action": json-numpy [A] (or the executed chunk [k, A]), "server_timing": {"infer_ms", "queue_ms", "total_ms",
  "batch_size"}}``; the action is :meth:`~rvla_peft.policies.base.Policy.predict_action`'s. A pi0 policy with
  ``policy.use_state`` also takes ``"state"`` (float [D]).
- ``GET /health`` (and openpi's ``/healthz``): ``{"status": "ok"}``, without the token.
- ``GET /metadata``: what the server was started with (family, action shape, image size, base, adapter, the
  adapter's robustness table).

Bad requests get a 4xx and ``{"error": "<one line>"}``; the server keeps serving. With a token, ``/act`` and
``/metadata`` need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from dataclasses import dataclass

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rvla_peft.serving import json_numpy
from rvla_peft.serving.batching import ActionBatcher

DEFAULT_MAX_BODY_BYTES = 16 * 2**20


@dataclass
class ActInputs:
    image: np.ndarray
    instruction: str
    state: np.ndarray | None = None


def _json(content: dict, status_code: int = 200) -> Response:
    return Response(json_numpy.dumps(content), status_code=status_code, media_type="application/json")


def parse_act(payload, image_hw: tuple[int, int], unnorm_key: str | None, needs_state: bool) -> ActInputs:
    """The checked inputs of one ``/act`` body; HTTPException(400) naming what is wrong and how to send it."""

    def bad(message: str):
        return HTTPException(400, message)

    if isinstance(payload, dict) and isinstance(payload.get("encoded"), str):  # OpenVLA's client wrapper
        try:
            payload = json_numpy.loads(payload["encoded"])
        except ValueError as e:
            raise bad(f"'encoded' is not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise bad(f'the body must be a JSON object {{"image": ..., "instruction": ...}}, got {type(payload).__name__}')
    for key in ("image", "instruction"):
        if key not in payload:
            raise bad(f"missing field {key!r}: send {{'image': uint8 [H, W, 3] in json-numpy, 'instruction': str}}")
    image = payload["image"]
    if not isinstance(image, np.ndarray):
        raise bad(
            "image must be a json-numpy array ({'__numpy__': base64, 'dtype': '|u1', 'shape': [H, W, 3]}), got "
            f"{type(image).__name__}"
        )
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise bad(f"image must be uint8 [H, W, 3] (RGB), got {image.dtype} of shape {list(image.shape)}")
    if tuple(image.shape[:2]) != tuple(image_hw):
        h, w = image_hw
        raise bad(f"image is {image.shape[0]}x{image.shape[1]}, this policy takes {h}x{w}: resize it before sending")
    instruction = payload["instruction"]
    if not isinstance(instruction, str) or not instruction.strip():
        raise bad(f"instruction must be a non-empty string, got {instruction!r:.60}")
    key = payload.get("unnorm_key")
    if key is not None and key != unnorm_key:
        raise bad(f"unnorm_key={key!r}, but this server un-normalises with {unnorm_key!r}; omit it or send that one")
    state = payload.get("state")
    if needs_state:
        if not isinstance(state, np.ndarray) or state.ndim != 1 or state.dtype.kind not in "iuf":
            raise bad("this policy reads the robot state (policy.use_state): send 'state' as a json-numpy float [D]")
        state = state.astype(np.float32)
    else:
        state = None
    return ActInputs(image, instruction, state)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) beyond ``limit`` bytes. An oversized body is still read to its end (and dropped),
    so that the reply reaches a client that is still sending; only a declared length far beyond it is cut off."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 64 * limit:
        raise HTTPException(413, f"body of {declared} bytes; at most {limit} bytes are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise HTTPException(413, f"body of {size} bytes; at most {limit} bytes are accepted (--max-body-bytes)")
    return b"".join(chunks)


def create_app(
    policy,
    metadata: dict,
    image_hw: tuple[int, int],
    *,
    max_batch: int = 16,
    max_wait_ms: float = 0.0,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Starlette:
    """The app serving ``policy`` (in eval mode, its LoRA merged by the caller). Its forwards run on one thread,
    in batches (:class:`~rvla_peft.serving.batching.ActionBatcher`)."""
    unnorm_key = getattr(policy.cfg, "unnorm_key", None)
    needs_state = bool(getattr(policy.cfg, "use_state", False))

    def predict(batch: list[ActInputs]) -> list[np.ndarray]:
        states = [i.state for i in batch] if needs_state else None
        return policy.predict_actions([i.image for i in batch], [i.instruction for i in batch], states=states)

    batcher = ActionBatcher(predict, max_batch=max_batch, max_wait_s=max_wait_ms / 1000)

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'")

    async def act(request: Request) -> Response:
        received = time.perf_counter()
        authorize(request)
        body = await _read_body(request, max_body_bytes)
        try:
            payload = json_numpy.loads(body)
        except (ValueError, RecursionError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise HTTPException(400, f"the body is not JSON with json-numpy arrays: {reason}") from None
        inputs = parse_act(payload, image_hw, unnorm_key, needs_state)
        answer = await asyncio.wrap_future(batcher.submit(inputs))
        timing = {
            "infer_ms": answer.infer_ms,
            "queue_ms": answer.queue_ms,
            "total_ms": 1000 * (time.perf_counter() - received),
            "batch_size": answer.batch_size,
        }
        return _json({"action": answer.action, "server_timing": timing})

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    async def get_metadata(request: Request) -> Response:
        authorize(request)
        return _json(metadata)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _json({"error": str(exc.detail)}, status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        return _json({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}, 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(batcher.close)

    return Starlette(
        routes=[
            Route("/act", act, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/healthz", health, methods=["GET"]),
            Route("/metadata", get_metadata, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
