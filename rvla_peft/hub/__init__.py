"""Share a robust adapter on the Hugging Face Hub: a model card, one-commit pushes, and loading it back.

    python -m rvla_peft.hub push outputs/run --repo-id user/robust-pickcube [--private] [--revision BRANCH]
    python -m rvla_peft.hub card outputs/run [--out DIR]     # the exact folder `push` would upload, locally

A push uploads, in ONE commit: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, safetensors
only), the value head, the resolved ``recipe.yaml``, the robustness report (``report.json``, ``report.md``,
``robustness.png`` from ``OUTPUT/report`` or ``--report DIR``), the training curve drawn from ``metrics.jsonl``,
and a model card (``README.md``) whose ``model-index`` holds the success rate under each evaluated setting.
Everything is staged in a temporary folder first: the run folder is only read, so a failed push changes nothing
locally. The pushed ``adapter_config.json`` names the base by its Hub id, never by a local path.

The token comes from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``); it is never written to a
file, a log line or an error message. Network errors and 5xx answers are retried with exponential backoff.

``load_policy`` (in :mod:`rvla_peft.policies.registry`) uses :mod:`rvla_peft.adapters` to rebuild the trained
policy from a Hub id or a folder. Modules: ``run_files`` (what a run folder holds), ``card`` (staging the upload:
files, curve, card), ``push`` (one commit, retries, errors), ``cli``; the card is rendered by :mod:`rvla_peft.cards`.
"""

from rvla_peft.adapters import BaseMismatchError, HubError, is_hub_id
from rvla_peft.cards import adapter_card as render_card  # the adapter's model card
from rvla_peft.hub.card import resolve_base_id, stage
from rvla_peft.hub.push import push_adapter, push_training_output
from rvla_peft.hub.run_files import RunFiles

__all__ = [
    "BaseMismatchError",
    "HubError",
    "RunFiles",
    "is_hub_id",
    "push_adapter",
    "push_training_output",
    "render_card",
    "resolve_base_id",
    "stage",
]
