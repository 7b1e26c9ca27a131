"""Push a run to the Hub in one commit, with retries on network errors and 5xx answers and errors that name the fix.
The token comes from huggingface_hub's usual sources and is never written to a file, a log line or an error."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from rvla_peft.adapters import HubError
from rvla_peft.hub.card import resolve_base_id, stage
from rvla_peft.hub.run_files import RunFiles
from rvla_peft.utils.constants import ADAPTER_CONFIG, TRAINER_STATE

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, HfApi

    from rvla_peft.config import TrainConfig

logger = logging.getLogger("rvla_peft.hub")

_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
RETRIES, BACKOFF_S = 3, 2.0  # a failed request is retried after 2, 4 and 8 s

T = TypeVar("T")


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_network_error(error: BaseException) -> bool:
    """Connection refused or reset, DNS, timeouts: the HTTP client's transport errors (httpx2 from
    huggingface_hub 2, httpx before)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return isinstance(error, httpx.TransportError)


def _is_transient(error: BaseException) -> bool:
    return _is_network_error(error) or _status(error) in _TRANSIENT_STATUS


def _with_retries(action: Callable[[], T], what: str, retries: int, backoff_s: float) -> T:
    """``action()``, retried with exponential backoff on network errors and 408/429/5xx answers."""
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as error:
            if not _is_transient(error) or attempt == retries:
                raise
            wait = backoff_s * 2**attempt
            logger.warning("%s failed (%s); retry %d/%d in %.1f s", what, _describe(error), attempt + 1, retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _describe(error: BaseException) -> str:
    status = _status(error)
    if status is None:
        return f"{type(error).__name__}: {error}".splitlines()[0]
    message = getattr(error, "server_message", None) or ""
    return f"HTTP {status}" + (f": {message.strip()}" if message.strip() else "")


def _hub_error(error: BaseException, repo_id: str, user: str | None, attempts: int) -> HubError:
    """A clear message for a failed push; the token never appears in it (errors carry no request headers)."""
    from huggingface_hub import constants

    status = _status(error)
    untouched = "No commit was made and the local files are unchanged."
    if _is_network_error(error):
        return HubError(
            f"could not reach the Hub at {constants.ENDPOINT} after {attempts} attempts ({_describe(error)}): check "
            f"the network or HF_ENDPOINT, then run the push again. {untouched}"
        )
    if status == 401:
        return HubError(
            f"the Hub ({constants.ENDPOINT}) rejected your token (401): log in again with `hf auth login` or set "
            f"HF_TOKEN to a token with write access. {untouched}"
        )
    if status == 403:
        namespace, name = repo_id.split("/")[0], repo_id.split("/")[-1]
        return HubError(
            f"{user or 'you'} may not write to {repo_id} (403 Forbidden: {_describe(error)}): the repo belongs to "
            f"'{namespace}', or your token is read-only. Push to a repo of your own "
            f"(--repo-id {user or 'USER'}/{name}) or use a write token of '{namespace}'. {untouched}"
        )
    if status in _TRANSIENT_STATUS:
        return HubError(
            f"the Hub at {constants.ENDPOINT} failed to take the push to {repo_id} after {attempts} attempts "
            f"({_describe(error)}): try again later (https://status.huggingface.co). {untouched}"
        )
    return HubError(f"push to {repo_id} failed ({_describe(error)}). {untouched}")


def _token(token: str | None) -> str:
    from huggingface_hub import constants, get_token

    token = token or get_token()
    if not token:
        raise HubError(
            f"not logged in to the Hugging Face Hub ({constants.ENDPOINT}): run `hf auth login` or set HF_TOKEN to "
            "a token with write access, then push again"
        )
    return token


def _whoami(api: HfApi, retries: int, backoff_s: float) -> str:
    try:
        return _with_retries(lambda: api.whoami()["name"], "whoami", retries, backoff_s)
    except Exception as error:
        raise _hub_error(error, "your account", None, retries + 1) from None


def push_adapter(
    path: str | Path,
    repo_id: str,
    *,
    adapter_dir: str | Path | None = None,
    report_dir: str | Path | bool | None = None,
    policy: str | None = None,
    private: bool = False,
    revision: str | None = None,
    base_id: str | None = None,
    commit_message: str | None = None,
    checkpoint_update: int | None = None,
    token: str | None = None,
    retries: int | None = None,
    backoff_s: float | None = None,
) -> CommitInfo:
    """Push a run's adapter, value head, card, report, training curve and recipe to ``repo_id`` in one commit.

    ``path`` is a run's output_dir (or an adapter folder). ``repo_id`` without a namespace goes under the logged-in
    user. ``revision`` is a branch, created from main when missing. ``report_dir`` is the eval's ``--out`` folder
    (default ``OUTPUT/report`` when it exists; False: no report); ``policy`` names the report's policy that is this
    adapter. Files are staged in a temporary folder, so the run folder is never modified, even when the push fails.
    Raises :class:`HubError` with the fix on failure; ``retries`` / ``backoff_s`` default to RETRIES / BACKOFF_S.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    retries = RETRIES if retries is None else retries
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    run = RunFiles.find(path, adapter_dir=adapter_dir, report_dir=report_dir)
    adapter_config = json.loads((run.adapter_dir / ADAPTER_CONFIG).read_text())
    base_id = resolve_base_id(adapter_config.get("base_model_name_or_path"), run.cfg.model, base_id)
    api = HfApi(token=_token(token))
    user = _whoami(api, retries, backoff_s)
    repo_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    with tempfile.TemporaryDirectory(prefix="rvla_peft_push_") as tmp:
        staging = Path(tmp)
        files = stage(
            run,
            staging,
            repo_id=repo_id,
            base_id=base_id,
            policy=policy,
            revision=revision,
            checkpoint_update=checkpoint_update,
        )
        size = sum((staging / f).stat().st_size for f in files)
        target = f"{repo_id}@{revision}" if revision else repo_id
        logger.info("Pushing %d files (%.1f kB) to %s in one commit: %s", len(files), size / 1e3, target, files)
        message = commit_message or f"Upload robust LoRA adapter ({run.cfg.env.task})"

        def upload() -> CommitInfo:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(staging / f)) for f in files]
            return api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision)

        try:
            info = _with_retries(upload, f"push to {target}", retries, backoff_s)
        except Exception as error:
            raise _hub_error(error, repo_id, user, retries + 1) from None
    logger.info("Pushed %s: %s", target, info.commit_url)
    return info


def push_training_output(cfg: TrainConfig, directory: str | Path, *, checkpoint: bool = False) -> CommitInfo | None:
    """The trainer's hook (``hub.push_to_hub`` / ``hub.push_checkpoints``): push ``directory`` as ``cfg.hub`` says.

    A checkpoint goes to ``hub.checkpoint_revision`` and a failure there only warns (a network blip must not stop a
    long run); a failure of the final push raises, naming the command that retries it.
    """
    hub, output = cfg.hub, Path(cfg.output_dir)
    if checkpoint:
        state = Path(directory) / TRAINER_STATE
        update = json.loads(state.read_text())["update"] if state.is_file() else None
        try:
            return push_adapter(
                output,
                hub.repo_id,
                adapter_dir=directory,
                report_dir=False,  # OUTPUT/report, if any, evaluated another adapter
                private=hub.private,
                revision=hub.checkpoint_revision,
                commit_message=f"Checkpoint at update {update}/{cfg.total_updates}",
                checkpoint_update=update,
            )
        except Exception as e:  # whatever went wrong, the run itself must go on
            logger.warning("checkpoint push failed; training goes on: %s", e)
            return None
    try:
        return push_adapter(
            output,
            hub.repo_id,
            adapter_dir=directory,
            private=hub.private,
            revision=hub.revision,
            commit_message=f"Upload robust LoRA adapter ({cfg.env.task}, {cfg.total_updates} PPO updates)",
        )
    except HubError as e:
        raise HubError(
            f"training finished and the adapter is saved in {directory}, but the push failed: {e}\n"
            f"Push it again with: python -m rvla_peft.hub push {output} --repo-id {hub.repo_id}"
            + (f" --revision {hub.revision}" if hub.revision else "")
        ) from None
