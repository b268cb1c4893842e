"""A federation with a 12-patient hospital: the run completes and shows no figure about it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from multimodal_fl.cli import app
from tests.conftest import write_tiny_config

SMALL = "site_d"
#: metrics.json's documents of the predict stage (the predict slice of issue 12 suppresses
#: their small cells); every other part of the server's documents is checked here.
PREDICT_STAGE = ("sites", "pooled_from_histograms", "missing_sites", "missing_reasons")


def small_site(source: Path, target: Path, n: int = 12) -> Path:
    """A site of the first ``n`` patients of ``source`` (their FHIR bundles and images)."""
    (target / "fhir").mkdir(parents=True)
    (target / "images").mkdir()
    for path in sorted((source / "fhir").glob("*.json"))[:n]:
        shutil.copy(path, target / "fhir" / path.name)
        for image in (source / "images").glob(f"{path.stem}.*"):
            shutil.copy(image, target / "images" / image.name)
    return target


def figures_about(doc: Any, site: str, path: str = "") -> list[str]:
    """Every number in ``doc`` found below a key naming ``site`` (with where it is)."""
    found: list[str] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            here = f"{path}/{key}"
            if key == site:
                found += [f"{here}: {x}" for x in _numbers(value)]
            else:
                found += figures_about(value, site, here)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += figures_about(value, site, f"{path}[{i}]")
    return found


def _numbers(doc: Any) -> list[float]:
    if isinstance(doc, dict):
        return [x for v in doc.values() for x in _numbers(v)]
    if isinstance(doc, list):
        return [x for v in doc for x in _numbers(v)]
    return [doc] if isinstance(doc, int | float) and not isinstance(doc, bool) else []


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path
              ) -> tuple[Path, str, int]:
    """``mmfl train`` over the three tiny sites and a fourth of 12 patients (2 rounds); the
    embedding cache in its default place."""
    root = tmp_path_factory.mktemp("small_site")
    site = small_site(tiny_sample / "covid_oxygen" / "site_a", root / SMALL)
    config = write_tiny_config(root, tiny_sample, tiny_bert, "covid_oxygen",
                               data={"cache_dir": None})
    doc = yaml.safe_load(config.read_text())
    doc["sites"].append({"name": SMALL, "path": str(site)})
    config.write_text(yaml.safe_dump(doc))
    run = root / "run"
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(run)])
    return run, result.output, result.exit_code


def test_a_run_with_a_12_patient_site_completes(small_run: tuple[Path, str, int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run, output, code = small_run
    assert code == 0, output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["completed_rounds"] == 2
    for record in metrics["rounds"]:  # it declined every round, saying why; the round went on
        assert SMALL not in record["replied"] and len(record["replied"]) == 3
        assert "fewer than 10 training patients (site policy min_cell=5)" in \
            record["failed"][SMALL]
    assert SMALL not in metrics["standardisation"]["sites"]


def test_no_figure_about_the_small_site_leaves_it(small_run: tuple[Path, str, int]) -> None:
    run, output, _ = small_run
    metrics = json.loads((run / "metrics.json").read_text())
    server_side = {k: v for k, v in metrics.items() if k not in PREDICT_STAGE}
    assert figures_about(server_side, SMALL) == []
    # the round table shows "-" for it, every round
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("round  replied"))
    column = lines[header].split().index(f"auc:{SMALL}")
    rows = [line.split() for line in lines[header + 1:] if line[:1].isdigit()]
    assert len(rows) == 2 and all(row[column] == "-" for row in rows)
    # no tiny validation split discloses anything: the last round is kept, and the run says so
    assert "model selection: no round had a pooled validation AUC" in output
    assert metrics["selected_round"] == 2
    # its own egress log says what it declined and what it kept back
    log = [json.loads(line) for line in
           (run / "sites" / SMALL / "egress.jsonl").read_text().splitlines()]
    declined = {e["kind"] for e in log if not e["released"]}
    assert {"info", "moments", "fit"} <= declined
    evaluated = [e for e in log if e["kind"] == "evaluate"]
    assert evaluated and all(e["n_samples"] == 0 and e["metrics"] == [] for e in evaluated)


def test_nothing_derived_from_patients_is_outside_the_sites_folders(
    small_run: tuple[Path, str, int]
) -> None:
    run, _, _ = small_run
    top = {p.name for p in run.iterdir()}
    assert "cache" not in top
    assert top <= {"run.json", "config.yaml", "metrics.json", "model.safetensors", "checkpoint",
                   "report", "model_card.json", "model_card.md", "sites", "disclosed"}
    for site in ("site_a", "site_b", "site_c", SMALL):
        shards = list((run / "sites" / site / "cache").rglob("shard-*.npz"))
        assert shards, site  # its embeddings are cached in its own folder
