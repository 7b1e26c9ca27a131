"""Adapter folders: resolve a local folder or a Hub id to files on disk, find the recipe an adapter was trained with,
and refuse an adapter on another base. No model is loaded here (``rvla_peft.policies.registry.load_policy`` does)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

from rvla_peft.config import ModelConfig
from rvla_peft.utils.constants import (
    ACTION_HEADS_FILE,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BUILTIN_PREFIX,
    HUB_REPO_ID_PATTERN,
    POLICY_FILES,
    RECIPE_FILE,
    VALUE_HEAD_FILE,
)


class HubError(RuntimeError):
    """A push or a download that cannot go on; the message names the problem and the fix."""


class BaseMismatchError(ValueError):
    """An adapter loaded on a base other than the one it was trained on."""


def is_local_path(name: str) -> bool:
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).exists()
    )


def is_hub_id(name: str | None) -> bool:
    """A model id on the Hub ('org/name' or a canonical 'name'), not a builtin model or a local folder."""
    if not name or ":" in name or is_local_path(name):
        return False
    return re.fullmatch(HUB_REPO_ID_PATTERN, name) is not None


class AdapterFolderError(HubError):
    """An adapter folder that cannot be loaded: the message names the missing or damaged file."""


def check_adapter_folder(path: str | Path) -> Path:
    """Refuse, naming the file, an adapter folder that PEFT could not load: ``adapter_config.json`` missing or not
    JSON, ``adapter_model.safetensors`` missing or with an unreadable header (a truncated download or copy), or a
    damaged value/action head file, or a weight that is not finite. Cheap (an adapter is small, the base is not
    read), so it runs before any base model loads; without it, PEFT takes a folder without weights for a Hub id
    (``HFValidationError``) and a truncated file fails after the base has loaded."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise AdapterFolderError(f"adapter folder {path} does not exist")
    if not path.is_dir():
        raise AdapterFolderError(f"adapter {path} is a file, not an adapter folder (one holding {ADAPTER_CONFIG})")
    config = path / ADAPTER_CONFIG
    if not config.is_file():
        raise AdapterFolderError(f"adapter folder {path} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    try:
        parsed = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterFolderError(f"{config} is damaged (not valid JSON: {e})") from None
    if not isinstance(parsed, dict):
        raise AdapterFolderError(f"{config} is damaged (a JSON object was expected)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterFolderError(f"adapter folder {path} has no {ADAPTER_WEIGHTS} (the LoRA weights)")
    for name in (ADAPTER_WEIGHTS, VALUE_HEAD_FILE, ACTION_HEADS_FILE):
        file = path / name
        if name != ADAPTER_WEIGHTS and not file.is_file():
            continue  # optional: a plain PEFT adapter has no heads
        try:  # safetensors checks the header and that the data covers every tensor it lists (truncation)
            with safe_open(str(file), framework="pt") as f:
                bad = next((k for k in f.keys() if not _all_finite(f.get_tensor(k))), None)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad file
            reason = " ".join(str(e).split()) or type(e).__name__
            raise AdapterFolderError(f"{file} is damaged (truncated or not safetensors): {reason}") from None
        if bad is not None:
            raise AdapterFolderError(
                f"{file}: {bad} holds NaN or infinite values (a diverged run): its policy would act as garbage; use "
                "an earlier checkpoint"
            )
    return path


def _all_finite(tensor) -> bool:
    return not tensor.is_floating_point() or bool(tensor.isfinite().all())


def resolve_adapter(adapter: str | Path, *, revision: str | None = None, token: str | None = None) -> Path:
    """A local adapter folder as it is; ``builtin:NAME`` the one packaged in rvla_peft/assets; a Hub id downloaded
    (only the files a policy needs) into the HF cache."""
    if str(adapter).startswith(BUILTIN_PREFIX):
        from rvla_peft.models.tiny import resolve_builtin_adapter

        return check_adapter_folder(resolve_builtin_adapter(str(adapter)))
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    path = Path(adapter).expanduser()
    if not path.exists() and is_local_path(str(adapter)):  # a path, not a Hub id: say the folder is missing
        raise AdapterFolderError(
            f"adapter folder {path} does not exist ({str(adapter)!r} is neither a folder nor a Hub repo id)"
        )
    if path.exists():
        return check_adapter_folder(path)  # before any model loads: the missing or damaged file, by name
    try:
        validate_repo_id(str(adapter))
    except HFValidationError:
        raise HubError(f"adapter {str(adapter)!r} is neither a folder nor a Hub repo id like 'user/name'") from None
    try:
        local = Path(
            snapshot_download(str(adapter), revision=revision, allow_patterns=list(POLICY_FILES), token=token)
        )
        return check_adapter_folder(local)
    except RevisionNotFoundError:
        raise HubError(f"adapter {adapter}: the Hub repo has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"adapter {adapter!r}: no such folder, and no Hub repo of that name you can read at {constants.ENDPOINT} "
            "(for a private repo, log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"adapter {adapter!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE=1, or no network): download it once online"
        ) from None


def adapter_recipe(adapter_dir: Path) -> Path:
    """The recipe an adapter was trained with: beside it (OUTPUT/adapter, pushed repos) or in the run folder."""
    for d in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent):
        if (d / RECIPE_FILE).is_file():
            return d / RECIPE_FILE
    raise HubError(
        f"no {RECIPE_FILE} beside the adapter in {adapter_dir}: load it with "
        "rvla_peft.policies.registry.build_policy(cfg, adapter=...) and the config it was trained with"
    )


def with_base(model_cfg: ModelConfig, base: str | ModelConfig | None) -> ModelConfig:
    """The recipe's model section with ``base`` swapped in; None keeps the recipe's base (its Hub id when the
    recipe's path was local to the machine that trained it)."""
    if isinstance(base, ModelConfig):
        return base
    if base is None:
        if model_cfg.hub_id and not Path(model_cfg.name_or_path).exists():
            return replace(model_cfg, name_or_path=model_cfg.hub_id)
        return model_cfg
    if base in (model_cfg.name_or_path, model_cfg.hub_id):
        return replace(model_cfg, name_or_path=base)
    return replace(model_cfg, name_or_path=base, hub_id=None, revision=None)


def check_base_match(adapter_dir: Path, base_id: str, *, allow: bool = False, adapter_name: str | None = None) -> None:
    """An adapter trained on another base gives garbage actions without any error: refuse unless ``allow``."""
    recorded = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if allow or not recorded or recorded == base_id:
        return
    raise BaseMismatchError(
        f"adapter {adapter_name or adapter_dir} was trained on base {recorded!r}, not {base_id!r}: load it on "
        f"{recorded!r} (base=None takes the recipe's), or pass allow_base_mismatch=True (--allow-base-mismatch) "
        "if both names are the same weights"
    )


class WarmupAdapterError(ValueError):
    """A warm-up adapter (``model.adapter``) that does not fit the run: another base or another policy family."""


def check_warmup_adapter(adapter_dir: Path, base_id: str, family: str, adapter_name: str | None = None) -> None:
    """Refuse, before the base loads, a warm-up adapter trained on another base or as another policy family (its
    LoRA would land on other weights, its heads would not fit): the base from its ``adapter_config.json``, the family
    from the recipe beside it (when it has one)."""
    import yaml

    name = adapter_name or str(adapter_dir)
    recorded = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if recorded and recorded != base_id:
        raise WarmupAdapterError(
            f"model.adapter={name} was trained on base {recorded!r}, not model.name_or_path={base_id!r}: start from "
            f"{recorded!r} (set model.name_or_path, or model.hub_id if it is the same weights under another name)"
        )
    try:
        recipe = adapter_recipe(Path(adapter_dir))
    except HubError:
        return  # a plain PEFT adapter: nothing records its family
    policy = (yaml.safe_load(recipe.read_text()) or {}).get("policy") or {}
    trained = policy.get("family", "action_tokens")
    if trained != family:
        raise WarmupAdapterError(
            f"model.adapter={name} is a {trained!r} adapter ({recipe.name}), this run is policy.family={family!r}: "
            f"set policy.family={trained} or warm up a {family!r} adapter"
        )
