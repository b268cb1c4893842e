"""What a completed run ends with: its report and the model card beside its weights.

:func:`finish_run` is called once per completed run by :func:`multimodal_fl.engines.run`:

- :func:`write_run_report` writes ``RUN_DIR/report/`` (``report.json``, ``report.html``). It
  is the one place a run's own report is built, from the documents the sites disclosed
  (``disclosed/<site>.json``), ``metrics.json`` and the cross-site matrix; never from
  ``sites/``.
- :func:`write_model_card` writes ``RUN_DIR/model_card.json`` and a short ``model_card.md``:
  the task, the data (each site's fingerprint), the training settings, the decision
  threshold (:func:`~multimodal_fl.evaluation.report.run_thresholds`: the thresholds
  the sites applied, and a global model's one value), and the per-site summary (the test
  metrics of ``metrics.json`` and, when the report was written, its per-site cells at the
  threshold). ``mmfl predict`` reads the threshold
  from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multimodal_fl.config import ExperimentConfig
from multimodal_fl.engines.recalibration import recalibration_line
from multimodal_fl.evaluation.report import (
    SPLIT,
    global_threshold,
    load_run,
    run_thresholds,
    write_report,
)
from multimodal_fl.rundir import RunManifest, jsonable
from multimodal_fl.training import enabled_modalities

__all__ = [
    "CARD_JSON",
    "CARD_MD",
    "REPORT_DIR",
    "WITHHELD_COUNT",
    "FinishedRun",
    "finish_run",
    "model_files",
    "model_thresholds",
    "read_model_card",
    "write_model_card",
    "write_run_report",
]

#: The run's own report folder, ``RUN_DIR/report``.
REPORT_DIR = "report"
#: The model card, beside the weights.
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
#: What a dash in the card's counts means (``model_card.md``, below the per-site table).
WITHHELD_COUNT = (
    "A dash is a count the site withheld: one on fewer than `min_cell` patients, or one from "
    "which such a count would follow by subtraction. A site's patients are withheld when its "
    "small splits hold fewer than `min_cell` patients in all: its training count leaves with "
    "every fit and its other splits' counts in its replies, so its total would give the small "
    "splits away.")

_LIMITATIONS = (
    "Measured only on the sites listed, on their test split; performance at any other site is "
    "unknown until measured there.",
    "Any recalibration (the card's recalibration) was fitted on the training sites' validation "
    "splits; at a new site the scores' calibration is unknown until measured there.",
    "A research model: not a medical device, not for clinical decisions.",
)


@dataclass(frozen=True)
class FinishedRun:
    """What :func:`finish_run` wrote.

    Attributes
    ----------
    report_html : Path or None
        ``None`` when the report was skipped.
    card_json, card_md : Path
    """

    report_html: Path | None
    card_json: Path
    card_md: Path


def write_run_report(run_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the run's own report into ``RUN_DIR/report/``.

    Parameters
    ----------
    run_dir : path-like
        A completed run.

    Returns
    -------
    json_path, html_path : Path
    """
    run = Path(run_dir)
    return write_report([run], run / REPORT_DIR)


def model_files(run_dir: str | os.PathLike[str], engine: str) -> dict[str, str]:
    """The run's weights, relative to the run directory: ``{"global": ...}`` or one per site.

    Parameters
    ----------
    run_dir : path-like
    engine : str
        ``local`` runs hold one model per site, the others one global model.

    Returns
    -------
    dict of str to str
    """
    run = Path(run_dir)
    if engine == "local":
        return {p.parent.name: p.relative_to(run).as_posix()
                for p in sorted((run / "sites").glob("*/model.safetensors"))}
    return {"global": "model.safetensors"} if (run / "model.safetensors").is_file() else {}


def model_thresholds(run_dir: str | os.PathLike[str], engine: str, rule: str
                     ) -> dict[str, Any]:
    """The run's decision threshold(s), as the sites applied them (the report's).

    Parameters
    ----------
    run_dir : path-like
    engine : str
        ``local`` runs have one model and threshold per site; the others one global model,
        whose one threshold (``global``) is the sites' common value, else their median.
    rule : str
        ``evaluation.threshold``.

    Returns
    -------
    dict
        ``rule``, ``values`` (per site), ``source``, ``notes`` and, for a global model,
        ``global``.
    """
    run = load_run(run_dir)
    global_model = engine != "local"
    values, source, notes = run_thresholds(run.disclosed, global_model=global_model)
    doc: dict[str, Any] = {"rule": rule, "values": values, "source": source, "notes": notes}
    if global_model:
        doc["global"] = global_threshold(values)
    return doc


def _site_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per site: cohort counts (all splits), test patients and test metrics (``metrics.json``)."""
    out: dict[str, Any] = {}
    for site, doc in sorted((metrics.get("sites") or {}).items()):
        test = (doc.get("metrics") or {}).get(SPLIT) or {}
        out[site] = {"n_patients": doc.get("n_patients"), "n_positive": doc.get("n_positive"),
                     "n_test": (test.get("auc") or {}).get("n"),
                     **{m: {k: v.get(k) for k in ("value", "lo", "hi", "reason")}
                        for m, v in test.items() if isinstance(v, dict)}}
    return out


def _report_cells(report_json: Path) -> dict[str, Any]:
    """Per site and metric, the report's cells at the threshold (scope ``site``)."""
    doc = json.loads(report_json.read_text())
    fairness: dict[str, Any] = next(iter(doc.get("fairness", {}).values()), {})
    out: dict[str, Any] = {}
    for cell in fairness.get("cells", []):
        if cell.get("scope") == "site":
            out.setdefault(cell["site"], {})[cell["metric"]] = {
                k: cell.get(k) for k in ("value", "lo", "hi", "n", "suppressed", "reason")}
    return out


def _training_settings(cfg: ExperimentConfig, engine: str,
                       metrics: dict[str, Any]) -> dict[str, Any]:
    """What the model is and how it was trained, in a few keys."""
    settings: dict[str, Any] = {
        "engine": engine,
        "seed": cfg.seed,
        "modalities": {m: getattr(cfg.modalities, m).model_dump(mode="json")
                       for m in enabled_modalities(cfg)},
        "fusion": cfg.fusion.model_dump(mode="json"),
        "training": cfg.training.model_dump(mode="json", exclude={"device", "num_threads"}),
    }
    if engine in ("inprocess", "flower"):
        fed = cfg.federated
        settings["federated"] = {
            "algorithm": fed.algorithm, "rounds": fed.rounds, "local_steps": fed.local_steps,
            "fedbn": fed.fedbn, "select": fed.select,
            "secure_aggregation": fed.secure_aggregation,
            "completed_rounds": metrics.get("completed_rounds"),
            "selected_round": metrics.get("selected_round"),
        }
    if cfg.federated.pca.enabled:
        settings["pca"] = cfg.federated.pca.model_dump(mode="json")
    return settings


def write_model_card(run_dir: str | os.PathLike[str], cfg: ExperimentConfig,
                     manifest: RunManifest, *, report_json: Path | None = None
                     ) -> tuple[Path, Path]:
    """Write ``model_card.json`` and ``model_card.md`` beside the run's weights.

    Parameters
    ----------
    run_dir : path-like
        A completed run.
    cfg : ExperimentConfig
        Its configuration.
    manifest : RunManifest
        Its manifest (data fingerprints, digest, version).
    report_json : Path or None
        The run's ``report.json``, whose per-site cells the card repeats.

    Returns
    -------
    json_path, md_path : Path
    """
    run = Path(run_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    card = {
        "format": 1,
        "run_id": manifest.run_id,
        "config_name": manifest.config_name,
        "config_digest": manifest.config_digest,
        "package_version": manifest.package_version,
        "engine": manifest.engine,
        "task": {"name": cfg.task.name, "description": cfg.task.description,
                 "label": cfg.task.label.model_dump(mode="json")},
        "data": manifest.data,
        "models": model_files(run, manifest.engine),
        "training": _training_settings(cfg, manifest.engine, metrics),
        "threshold": model_thresholds(run, manifest.engine, cfg.evaluation.threshold),
        "recalibration": metrics.get("recalibration"),
        # a DP-trained model says so: the settings and each site's epsilon (metrics.json's)
        "privacy": metrics.get("privacy"),
        "performance": {
            "split": SPLIT,
            "sites": _site_metrics(metrics),
            "report_sites": _report_cells(report_json) if report_json is not None else None,
            "report": (report_json.with_suffix(".html").relative_to(run).as_posix()
                       if report_json is not None else None),
        },
        "limitations": list(_LIMITATIONS),
    }
    json_path = run / CARD_JSON
    json_path.write_text(json.dumps(jsonable(card), indent=2))
    md_path = run / CARD_MD
    md_path.write_text(_card_markdown(card))
    return json_path, md_path


def _value(cell: dict[str, Any] | None) -> str:
    """``0.812 [0.70, 0.90]``, or ``—`` for an undefined or suppressed value."""
    if not cell or cell.get("value") is None:
        return "—"
    text = f"{cell['value']:.3f}"
    if cell.get("lo") is not None and cell.get("hi") is not None:
        text += f" [{cell['lo']:.2f}, {cell['hi']:.2f}]"
    return text


def _privacy_lines(privacy: dict[str, Any] | None) -> list[str]:
    """The card's privacy section: what differential privacy the model was trained under."""
    if not privacy:
        return ["Differential privacy: none (the model was trained without it).", ""]
    lines = ["## Differential privacy", ""]
    dp = privacy.get("dp")
    if dp:
        how = (f"noise multiplier {dp['noise_multiplier']}" if dp.get("noise_multiplier")
               else f"target epsilon {dp.get('target_epsilon')}")
        lines.append(f"DP-SGD at every site ({how}, max grad norm {dp.get('max_grad_norm')}); "
                     f"{dp.get('covers', '')}".rstrip("; "))
        lines += ["", "| site | epsilon | delta | round |", "| --- | --- | --- | --- |",
                  *[f"| {s} | {v['epsilon']:.3g} | {v.get('delta')} | {v.get('round')} |"
                    for s, v in sorted((dp.get("sites") or {}).items())], ""]
    level = privacy.get("site_level")
    if level:
        lines += [f"Site-level DP: epsilon {level['epsilon']:.3g} at delta {level.get('delta')} "
                  f"over {level.get('rounds')} rounds, updates clipped at the "
                  f"{level.get('clipped_at')}; {level.get('covers', '')}".rstrip("; "), ""]
    return lines


def _card_markdown(card: dict[str, Any]) -> str:
    """The model card as a short Markdown page."""
    thr = card["threshold"]
    values = [thr["global"]] if "global" in thr else sorted(set(thr["values"].values()))
    lines = [
        f"# Model card: {card['config_name']} ({card['engine']})", "",
        f"Task: **{card['task']['name']}**. {card['task']['description']}".rstrip(), "",
        f"Run {card['run_id']}, config {card['config_digest'][:19]}, multimodal_fl "
        f"{card['package_version']}. Weights: "
        + ", ".join(f"`{p}`" for p in card["models"].values()) + ".", "",
        f"Decision threshold ({thr['rule']}): "
        + ", ".join(f"{v:.4g}" for v in values) + f" ({thr['source']}).", "",
        (recalibration_line({"recalibration": card["recalibration"]})
         or "recalibration: none recorded (a run made before recalibration)") + ".", "",
        *_privacy_lines(card.get("privacy")),
        "## Data", "", "| site | fingerprint | files |", "| --- | --- | --- |",
        *[f"| {s} | `{d.get('fingerprint', '')[:19]}` | {d.get('files')} |"
          for s, d in sorted(card["data"].items())], "",
        f"## Per-site performance ({card['performance']['split']} split)", "",
        "| site | patients | positives | test patients | AUC [95% CI] | sensitivity | "
        "specificity |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    report = card["performance"]["report_sites"] or {}
    withheld = False
    for site, row in card["performance"]["sites"].items():
        cells = report.get(site, {})
        counts = ["—" if row.get(k) is None else row[k]  # withheld: a dash, not None
                  for k in ("n_patients", "n_positive", "n_test")]
        withheld = withheld or "—" in counts
        lines.append(f"| {site} | {counts[0]} | {counts[1]} | {counts[2]} | "
                     f"{_value(row.get('auc'))} | {_value(cells.get('sensitivity'))} | "
                     f"{_value(cells.get('specificity'))} |")
    if withheld:
        lines += ["", WITHHELD_COUNT]
    lines += ["", "## Limitations", "", *[f"- {x}" for x in card["limitations"]], "",
              "Score new patients: `mmfl predict RUN_DIR SITE_DIR --out predictions.csv"
              + (" --model-site SITE" if card["engine"] == "local" else "") + "`.", ""]
    return "\n".join(lines)


def read_model_card(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``RUN_DIR/model_card.json``, or ``None`` when the run has none.

    Parameters
    ----------
    run_dir : path-like

    Returns
    -------
    dict or None
    """
    path = Path(run_dir) / CARD_JSON
    if not path.is_file():
        return None
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def finish_run(run_dir: str | os.PathLike[str], cfg: ExperimentConfig, manifest: RunManifest,
               *, report: bool = True) -> FinishedRun:
    """End a completed run: its report (unless ``report`` is false), then its model card.

    Parameters
    ----------
    run_dir : path-like
    cfg : ExperimentConfig
    manifest : RunManifest
    report : bool
        Write ``RUN_DIR/report/``.

    Returns
    -------
    FinishedRun
    """
    html_path = report_json = None
    if report:
        report_json, html_path = write_run_report(run_dir)
    card_json, card_md = write_model_card(run_dir, cfg, manifest, report_json=report_json)
    return FinishedRun(html_path, card_json, card_md)
