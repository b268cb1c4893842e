"""The honest-verdict set-up (issue 14, item 6): frozen shipped configs, other generated cohorts.

``benchmarks/fl_vs_baselines.py --data-seeds`` points the shipped configs' sites at cohorts
generated with other generator seeds; the shipped configs were tuned on the seed-0 cohort and
are frozen (docs/benchmarks.md, "Federated vs centralized vs local-only").
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import yaml

from multimodal_fl.config import load_config
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]

#: sha256 of each shipped config's parsed content (comments aside), frozen at the verdicts.
FROZEN = {
    "covid_oxygen": "42dd40e14f6fe5a47d2be4f7baccfbed58f622b54e67c5870047d38a1f8e7ebb",
    "alzheimers": "98397c881b68bc326b75c5f507bf0d0c4b4e72092520a4fe63879fe8a362db5c",
}


def _script() -> ModuleType:
    """``benchmarks/fl_vs_baselines.py`` as a module (registered: it defines dataclasses)."""
    name = "fl_vs_baselines_under_test"
    if name not in sys.modules:
        load_script(ROOT / "benchmarks" / "fl_vs_baselines.py", name)
    return sys.modules[name]


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_shipped_configs_are_frozen(name: str) -> None:
    """A changed shipped config invalidates every verdict in docs/benchmarks.md."""
    data = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    assert digest == FROZEN[name], (
        f"configs/{name}.yaml changed: the shipped configs are frozen (tuned on the seed-0 "
        "sample cohort; see docs/benchmarks.md 'Federated vs centralized vs local-only'). A new "
        "setting needs the verdicts rerun (benchmarks/fl_vs_baselines.py --data-seeds 1 2) and "
        "this digest updated with them.")


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_site_path_overrides_point_the_sites_at_another_cohort(
        name: str, tmp_path: Path) -> None:
    config = ROOT / "configs" / f"{name}.yaml"
    data_root = tmp_path / "data seed 1"  # a space: the path is quoted for --set
    overrides = _script().site_path_overrides(config, data_root)
    shipped = load_config(config)
    moved = load_config(config, overrides)
    assert [s.name for s in moved.sites] == [s.name for s in shipped.sites]
    for before, after in zip(shipped.sites, moved.sites, strict=True):
        assert Path(after.path) == data_root.resolve() / name / before.name
        assert Path(before.path) == (ROOT / "sample_data" / name / before.name).resolve()
    assert moved.model_dump(exclude={"sites"}) == shipped.model_dump(exclude={"sites"})


def test_site_path_overrides_refuse_a_site_outside_the_sample_data(tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "task": "covid_oxygen_24h",
        "sites": [{"name": "site_a", "path": str(ROOT / "sample_data" / "covid_oxygen" / "site_a")},
                  {"name": "mine", "path": "hospital/mine"}],
        "modalities": {"tabular": {"encoder": "mlp"}}}))
    with pytest.raises(ValueError, match=r"site 'mine' .* is not under the sample data"):
        _script().site_path_overrides(config, tmp_path / "gen")


def _result(script: ModuleType, engine: str, seed: int, scores: dict[str, list[float]]
            ) -> object:
    """An EngineResult of two sites of 8 test patients (4 positive) with the given scores."""
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    rows = [{"site": site, "patient_id": f"{site}-{i}", "label": labels[i], "score": x}
            for site, xs in scores.items() for i, x in enumerate(xs)]
    test = pd.DataFrame(rows)
    return script.evaluate_rows(engine, seed, test, n_boot=50, seconds=0.0)


def test_verdict_table_judges_each_cohort_and_the_untuned_ones_together() -> None:
    script = _script()
    perfect = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]
    half = [0.1, 0.6, 0.3, 0.8, 0.2, 0.7, 0.4, 0.9]  # AUC 0.625 at each site
    verdicts = []
    for data_seed in (0, 1, 2):
        by = {"federated": _result(script, "federated", 0, {"a": perfect, "b": perfect}),
              "centralized": _result(script, "centralized", 0, {"a": perfect, "b": perfect}),
              "local": _result(script, "local", 0, {"a": half, "b": half})}
        verdicts.append(script.Verdict("covid", data_seed, {0: by}))
    table = script.verdict_table(verdicts, n_boot=50)
    rows = [line for line in table.splitlines() if line.startswith("| covid |")]
    assert [r.split(" | ")[1] for r in rows] == [
        "0 (shipped, tuned on)", "1", "2", "1, 2 together (not tuned on)"]
    for row in rows:  # federated = centralized (1.000), +60 % over local-only (1 / 0.625)
        assert "| 1.000 (" in row and "| **PASS** |" in row and "+60.0 %" in row
    assert "1.000 (1.000, 1.000) | **PASS**" in rows[-1]
