"""A robustness report as files: ``report.json``, ``report.md`` (a table) and ``robustness.png`` (success vs
severity per perturbation, one line per policy, 95% interval bands), each written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rvla_peft.perturbations.specs import CLEAN, resample_note
from rvla_peft.utils.constants import REPORT_JSON, REPORT_MD, REPORT_PNG
from rvla_peft.utils.io import atomic_write


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(interval: list[float]) -> str:
    return f"[{_pct(interval[0])}, {_pct(interval[1])}]"


# Reports written before they recorded their interval methods computed them this way.
_OLDER_METHODS = {
    "results": "Wilson score interval over the cell's episodes",
    "paired": "normal approximation of the per-episode differences",
    "arms": "Student-t interval over training seeds, the evaluation episodes held fixed",
}


def render_markdown(report: dict) -> str:
    """A table a person reads: success % [95% interval] per setting and policy (and when each setting's random
    parameters were drawn, where the report records it), then the gaps."""
    policies = [p["name"] for p in report["policies"]]
    cell = {(r["policy"], r["setting"]): r for r in report["results"]}
    notes = {s["name"]: resample_note(s.get("specs", [])) for s in report["settings"]}
    drawn = any(notes.values())  # reports written before the mode was recorded have no such column
    methods = report.get("intervals") or _OLDER_METHODS
    lines = [
        f"# Robustness report: {report['task']}",
        "",
        f"Suite `{report['suite']}`, {report['episodes']} episodes per cell, seed {report['seed']}, "
        f"{'deterministic' if report['deterministic'] else 'sampled'} actions, "
        f"{report.get('schedule', 'batch')} schedule. Success rate in % "
        "with its 95% interval [1]; every policy saw the same initial states and perturbation draws."
        + (" Random parameters: held per episode, or redrawn every step." if drawn else ""),
        "",
        "| setting | " + " | ".join(policies) + " |" + (" random parameters |" if drawn else ""),
        "|---|" + "---|" * (len(policies) + drawn),
    ]
    for s in report["settings"]:
        row = []
        for p in policies:
            r = cell[p, s["name"]]
            lo, hi = r["ci95"]
            row.append(f"{_pct(r['success_rate'])} [{_pct(lo)}, {_pct(hi)}]")
        if drawn:
            row.append(notes[s["name"]] or "-")
        lines.append(f"| {s['name']} | " + " | ".join(row) + " |")
    lines += ["", f"[1] {methods['results']}."]
    lines += ["", "| policy | clean | mean perturbed | robustness gap |", "|---|---|---|---|"]
    for p in policies:
        m = report["summary"][p]
        lines.append(
            f"| {p} | {_pct(m['clean_success_rate'])} | {_pct(m['mean_perturbed_success_rate'])} | "
            f"{_pct(m['robustness_gap'])} |"
        )
    if report["paired"]:
        has_p = any("p_mcnemar" in d for d in report["paired"])
        lines += ["", "Paired difference in success (percentage points, policy minus baseline, 95% interval [2]):", ""]
        lines += ["| policy - baseline | setting | difference |" + (" p |" if has_p else ""),
                  "|---|---|---|" + ("---|" if has_p else "")]  # fmt: skip
        for d in report["paired"]:
            p = f" {d['p_mcnemar']:.3g} |" if "p_mcnemar" in d else (" - |" if has_p else "")
            lines.append(
                f"| {d['policy']} - {d['baseline']} | {d['setting']} | {_pct(d['difference'])} {_ci(d['ci95'])} |{p}"
            )
        p_method = methods.get("p_mcnemar", "exact McNemar test")
        lines += ["", f"[2] {methods['paired']}" + (f"; p: {p_method}." if has_p else ".")]
    if report.get("arms"):
        lines += ["", "Training seeds: each seed's success, the mean over seeds and, against the baseline, the "
                  "difference and the share of its robustness gap closed (gap cut), each with its 95% interval [3]:",
                  ""]  # fmt: skip
        lines += ["| arm | setting | per seed | mean over seeds | minus baseline, per seed | difference | gap cut |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for a in report["arms"]:
            row = f"| {a['arm']} | {a['setting']} | {', '.join(_pct(v) for v in a['per_seed'])} | "
            row += f"{_pct(a['mean'])} {_ci(a.get('ci95', a['t95']))} | "
            if "difference" in a:
                row += f"{', '.join(_pct(v) for v in a['differences'])} | {_pct(a['difference'])} "
                row += f"{_ci(a.get('difference_ci95', a['difference_t95']))} | "
            else:
                row += "- | - | "
            row += f"{_pct(a['gap_cut'])} {_ci(a['gap_cut_ci95'])} |" if "gap_cut" in a else "- |"
            lines.append(row)
        arms = methods["arms"] if "ci95" in report["arms"][0] else _OLDER_METHODS["arms"]
        lines += ["", f"[3] {arms}."]
    if report.get("videos"):
        recorded = len(report["videos"][0]["seeds"])
        lines += ["", f"Rollouts: the first {recorded} episode{'s' if recorded > 1 else ''} of each setting, the "
                  "policies side by side on the same episode (what each saw; a green border: success, red: failure).",
                  ""]  # fmt: skip
        for v in report["videos"]:
            lines += [f"**{v['setting']}** ([MP4]({v['mp4']}))", "", f"![{v['setting']}]({v['gif']})", ""]
        lines.pop()
    lines += ["", "Command:", "", "```", report["command"], "```", ""]
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> None:
    """Success vs severity, one panel per perturbation (clean at severity 0), one line per policy, interval bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(r["policy"], r["setting"]): r for r in report["results"]}
    families: dict[str, list[dict]] = {}
    for s in report["settings"]:
        if s["perturbation"] != CLEAN.name:
            families.setdefault(s["perturbation"], []).append(s)
    panels = list(families) or [CLEAN.name]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    has_clean = any(s["name"] == CLEAN.name for s in report["settings"])
    for ax, family in zip(axes.flat, panels, strict=False):
        points = ([{"name": CLEAN.name, "severity": 0.0}] if has_clean else []) + sorted(
            families.get(family, []), key=lambda s: s["severity"]
        )
        for policy in (p["name"] for p in report["policies"]):
            xs = [s["severity"] for s in points]
            rs = [cell[policy, s["name"]] for s in points]
            ax.plot(xs, [r["success_rate"] for r in rs], marker="o", label=policy)
            ax.fill_between(xs, [r["ci95"][0] for r in rs], [r["ci95"][1] for r in rs], alpha=0.15)
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("severity")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel("success rate")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{report['task']}: success under perturbation ({report['episodes']} episodes per point)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    """Write the three files, each atomically (a temp file renamed into place): no half-written report."""
    atomic_write(out / REPORT_JSON, lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(out / REPORT_MD, lambda p: p.write_text(render_markdown(report)))
    atomic_write(out / REPORT_PNG, lambda p: plot_report(report, p))
