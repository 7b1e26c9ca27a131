"""What a training run's folder holds, as a push reads it (never writes)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from rvla_peft.adapters import HubError, check_adapter_folder
from rvla_peft.config import ConfigError, TrainConfig, load_config
from rvla_peft.utils.constants import ADAPTER_CONFIG, ADAPTER_DIR, METRICS_FILE, RECIPE_FILE, REPORT_DIR, REPORT_JSON


@dataclass
class RunFiles:
    """The files of one training run that a push reads (never writes)."""

    output_dir: Path
    adapter_dir: Path
    recipe: Path
    metrics: Path | None
    report_dir: Path | None

    @classmethod
    def find(
        cls, path: str | Path, adapter_dir: str | Path | None = None, report_dir: str | Path | bool | None = None
    ) -> RunFiles:
        """``path`` is a run's output_dir (the adapter in ``path/adapter``) or an adapter / checkpoint folder.

        ``report_dir``: None looks for ``OUTPUT/report``; False means no report (a checkpoint is not what was
        evaluated).
        """
        path = Path(path)
        if adapter_dir is not None:
            adapter, output = Path(adapter_dir), path
        elif (path / ADAPTER_CONFIG).is_file():  # an adapter or checkpoint folder: the run is above it
            adapter = path
            candidates = (path.parent, path.parent.parent)
            output = next((d for d in candidates if (d / RECIPE_FILE).is_file()), path.parent)
        else:
            adapter, output = path / ADAPTER_DIR, path
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise HubError(
                f"no adapter in {path}: expected {adapter / ADAPTER_CONFIG} (training writes OUTPUT/{ADAPTER_DIR}/); "
                "pass a run's output_dir or an adapter folder"
            )
        check_adapter_folder(adapter)  # a damaged or non-finite adapter is never carded or pushed
        recipe = next((d / RECIPE_FILE for d in (adapter, output) if (d / RECIPE_FILE).is_file()), None)
        if recipe is None:
            raise HubError(
                f"no {RECIPE_FILE} in {adapter} or {output}: the card and load_policy need the recipe the adapter "
                "was trained with (training writes it beside the adapter)"
            )
        if report_dir is False:
            report = None
        elif report_dir is not None and report_dir is not True:
            report = Path(report_dir)
            if not (report / REPORT_JSON).is_file():
                raise HubError(
                    f"--report {report}: no {REPORT_JSON} there; run `python -m rvla_peft.eval ... --out DIR`"
                )
        else:
            report = output / REPORT_DIR if (output / REPORT_DIR / REPORT_JSON).is_file() else None
        metrics = output / METRICS_FILE if (output / METRICS_FILE).is_file() else None
        return cls(output, adapter, recipe, metrics, report)

    @cached_property
    def cfg(self) -> TrainConfig:
        """The resolved recipe the adapter was trained with."""
        try:
            return load_config(self.recipe)
        except ConfigError as e:
            raise HubError(f"{self.recipe}: {e}") from None

    def report(self) -> dict | None:
        return json.loads((self.report_dir / REPORT_JSON).read_text()) if self.report_dir else None

    def metric_rows(self) -> list[dict]:
        if self.metrics is None:
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
