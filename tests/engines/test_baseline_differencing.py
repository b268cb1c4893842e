"""The differencing attack on the baselines' pooled figures (centralized and local-only).

The centralized engine pools the sites' test histograms in process as the secure sum would (at
least three sites, complete parts); the local-only job runs the secure sum itself. A site whose
histograms are in that total must release no count of the same patients, or the pooled total
minus the other sites' released counts gives what one site hides. The attacker here reads only
what leaves the sites: ``disclosed/<site>.json``, ``metrics.json`` and ``report.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from multimodal_fl.config import load_config
from multimodal_fl.engines import baselines
from multimodal_fl.engines.baselines import run_centralized, run_local
from multimodal_fl.evaluation.disclosed import site_disclosure
from multimodal_fl.evaluation.report import write_report
from multimodal_fl.federated import site as site_module

MIN_CELL = 10
#: site_a's test positives: hidden at the site (fewer than MIN_CELL), the attack's target.
HIDDEN = 4
#: site_d's test patients: hidden at the site, outside the pooled total.
HIDDEN_N = 7


def _frame(n_test: int, n_pos: int, seed: int) -> pd.DataFrame:
    """A predictions table: ``n_test`` test patients (``n_pos`` positives), 40 train, 40 val."""
    rng = np.random.default_rng(seed)
    total = n_test + 80
    y = (rng.random(total) < 0.5).astype(int)
    y[:n_test] = (np.arange(n_test) < n_pos).astype(int)
    score = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0.01, 0.99)
    return pd.DataFrame({
        "patient_id": [f"p{seed}-{i}" for i in range(total)],
        "split": ["test"] * n_test + ["train"] * 40 + ["val"] * 40, "label": y, "score": score,
        "sex": np.where(np.arange(total) % 2 == 0, "female", "male"),
        "age_band": np.where(rng.random(total) < 0.5, "40-59", "60+"),
    })


#: site_a hides its 4 test positives; site_b and site_c release theirs unless pooled; site_d
#: has 7 test patients (not in the pooled total; its test size is hidden).
FRAMES = {"site_a": _frame(40, HIDDEN, 1), "site_b": _frame(60, 25, 2),
          "site_c": _frame(50, 20, 3), "site_d": _frame(HIDDEN_N, 3, 4)}


def _released_positives(site_metrics: Mapping[str, Any], disclosed: Mapping[str, Any]
                        ) -> dict[str, int]:
    """Each part of the pooled total (``overall``, ``<attribute>=<level>``) whose test positives
    at this site follow from what the site released, and that count."""
    out: dict[str, int] = {}
    splits = disclosed["splits"]
    if splits["test"]["n_pos"] is not None:
        out["overall"] = splits["test"]["n_pos"]
    n_positive = site_metrics.get("n_positive")
    if n_positive is not None and None not in (splits["train"]["n_pos"], splits["val"]["n_pos"]):
        out["overall"] = n_positive - splits["train"]["n_pos"] - splits["val"]["n_pos"]
    for cell in disclosed["cells"]:
        if cell["n_pos"] is None:
            continue
        if cell["scope"] == "site":
            out["overall"] = cell["n_pos"]
        elif cell["scope"] == "site_subgroup":
            out[f"{cell['attribute']}={cell['group']}"] = cell["n_pos"]
    return out


def _differencing(pooled: Mapping[str, Any], released: Mapping[str, dict[str, int]],
                  target: str) -> list[int]:
    """Every count of ``target``'s test positives the attack gives: a pooled part's positives
    minus the other contributors' released ones."""
    parts = {"overall": pooled.get("overall") or {}}
    for attribute, levels in (pooled.get("subgroups") or {}).items():
        parts.update({f"{attribute}={g}": cell for g, cell in levels.items()})
    found = []
    for part, cell in parts.items():
        others = [s for s in cell.get("sites") or [] if s != target]
        if cell.get("n_pos") is None or target not in (cell.get("sites") or []):
            continue
        if all(part in released.get(s, {}) for s in others):
            found.append(cell["n_pos"] - sum(released[s][part] for s in others))
    return found


def _attack(run_dir: Path) -> tuple[list[int], list[int], dict[str, dict[str, int]]]:
    """From the run directory's outputs only: site_a's test positives, site_d's test size."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    disclosed = {p.stem: json.loads(p.read_text())
                 for p in sorted((run_dir / "disclosed").glob("*.json"))}
    released = {s: _released_positives(metrics["sites"].get(s, {}), d)
                for s, d in disclosed.items()}
    positives = _differencing(metrics["pooled_from_histograms"], released, "site_a")
    sizes = []
    for section in ("pooled",):  # an all-sites patient-level figure, if any, with its n
        test = (metrics.get(section) or {}).get("test") or {}
        n_all = (test.get("auc") or {}).get("n")
        shown = [(d["splits"]["test"]["n"]) for s, d in disclosed.items() if s != "site_d"]
        if n_all is not None and None not in shown:
            sizes.append(n_all - sum(shown))
    return positives, sizes, released


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path
           ) -> Callable[[Path], Any]:
    """The tiny cohort's sites (site_d a copy of site_c), at ``min_cell`` 10."""
    import shutil

    from tests.conftest import write_tiny_config

    root = tmp_path_factory.mktemp("baseline_differencing")
    sample = root / "sample"
    shutil.copytree(tiny_sample / "covid_oxygen", sample / "covid_oxygen")
    shutil.copytree(sample / "covid_oxygen" / "site_c", sample / "covid_oxygen" / "site_d")
    path = write_tiny_config(root, sample, tiny_bert, "covid_oxygen",
                             evaluation={"min_cell": MIN_CELL, "n_boot": 0,
                                         "sensitive": ["sex"], "recalibrate": "none"})
    return lambda _: load_config(path)


def _check(run_dir: Path) -> None:
    positives, sizes, released = _attack(run_dir)
    assert HIDDEN not in positives, f"site_a's hidden test positives recovered: {positives}"
    assert HIDDEN_N not in sizes, f"site_d's hidden test size recovered: {sizes}"
    # stronger: a site in the pooled total releases no count of its test positives at all
    pooled = json.loads((run_dir / "metrics.json").read_text())["pooled_from_histograms"]
    assert sorted(pooled["overall"]["sites"]) == ["site_a", "site_b", "site_c"]
    assert pooled["overall"]["n_pos"] == HIDDEN + 25 + 20
    for site in pooled["overall"]["sites"]:
        assert released[site] == {}, site
    # the report, built from these files, shows no more than they do
    write_report([run_dir], run_dir / "report")
    report = json.loads((run_dir / "report" / "report.json").read_text())
    cells = next(iter(report["fairness"].values()))["cells"]
    assert not [c for c in cells if c["site"] in pooled["overall"]["sites"]
                and c.get("n_pos") is not None]


def test_the_attack_recovers_a_hidden_count_from_documents_not_in_pooled_form() -> None:
    """Not vacuous: the same attack on the full documents of the same sites gives site_a's 4."""
    docs = {s: site_disclosure(f, site=s, sensitive=["sex"], min_cell=MIN_CELL, n_boot=0,
                               seed=0, threshold_rule="0.5")
            for s, f in FRAMES.items()}
    released = {s: _released_positives({}, d) for s, d in docs.items()}
    assert "overall" not in released["site_a"]  # hidden at the site
    pooled = {"overall": {"sites": ["site_a", "site_b", "site_c"], "n_pos": HIDDEN + 25 + 20}}
    assert _differencing(pooled, released, "site_a") == [HIDDEN]


def test_centralized_releases_no_count_the_pooled_total_would_give_away(
    config: Callable[[Path], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(baselines, "predictions_frame",
                        lambda model, data, sensitive=(): FRAMES[data.site].copy())
    out = run_centralized(config(tmp_path), tmp_path / "c", warn=lambda _: None)
    _check(out.run_dir)


def test_local_only_releases_no_count_the_pooled_total_would_give_away(
    config: Callable[[Path], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(site_module, "predictions_frame",
                        lambda model, data, sensitive=(): FRAMES[data.site].copy())
    out = run_local(config(tmp_path), tmp_path / "l")
    _check(out.run_dir)


#: site_d now has a test split of its own size and a policy that refuses the secure sum.
REFUSING = {**FRAMES, "site_d": _frame(45, 18, 4)}


@pytest.fixture(scope="module")
def refusing_config(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path,
                    tiny_bert: Path) -> Any:
    """As ``config``, with site_d's ``policy.yaml`` answering every kind but ``secure_sum``."""
    import shutil

    import yaml

    from multimodal_fl.config import REQUEST_KINDS
    from tests.conftest import write_tiny_config

    root = tmp_path_factory.mktemp("refusing_secure_sum")
    sample = root / "sample"
    shutil.copytree(tiny_sample / "covid_oxygen", sample / "covid_oxygen")
    site_d = sample / "covid_oxygen" / "site_d"
    shutil.copytree(sample / "covid_oxygen" / "site_c", site_d)
    (site_d / "policy.yaml").write_text(yaml.safe_dump(
        {"answers": [k for k in REQUEST_KINDS if k != "secure_sum"]}))
    return load_config(write_tiny_config(root, sample, tiny_bert, "covid_oxygen",
                                         evaluation={"min_cell": MIN_CELL, "n_boot": 0,
                                                     "sensitive": ["sex"],
                                                     "recalibrate": "none"}))


def _check_refusing(run_dir: Path) -> None:
    """site_d is out of the pooled total, says why by its policy, and sends its document in
    the released form (its test positives shown, as a site not asked to pool); the other three
    are pooled and send the pooled form."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pooled = metrics["pooled_from_histograms"]
    assert sorted(pooled["overall"]["sites"]) == ["site_a", "site_b", "site_c"]
    assert "site policy does not answer 'secure_sum' requests" in \
        pooled["overall"]["excluded"]["site_d"]
    assert pooled["overall"]["n_pos"] == HIDDEN + 25 + 20
    disclosed = {p.stem: json.loads(p.read_text())
                 for p in sorted((run_dir / "disclosed").glob("*.json"))}
    assert disclosed["site_d"]["pooled"] is False
    assert disclosed["site_d"]["splits"]["test"]["n_pos"] == 18
    assert [disclosed[s]["pooled"] for s in ("site_a", "site_b", "site_c")] == [True] * 3


def test_centralized_leaves_out_a_site_whose_policy_refuses_the_secure_sum(
    refusing_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the code before, the in-process total added site_d's test histograms, and site_d
    sent the pooled form, while on the federated engine it joins no secure sum."""
    monkeypatch.setattr(baselines, "predictions_frame",
                        lambda model, data, sensitive=(): REFUSING[data.site].copy())
    out = run_centralized(refusing_config, tmp_path / "c", warn=lambda _: None)
    _check_refusing(out.run_dir)


def test_local_only_leaves_out_a_site_whose_policy_refuses_the_secure_sum(
    refusing_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The federated engine's behaviour, which the in-process pooling now agrees with."""
    monkeypatch.setattr(site_module, "predictions_frame",
                        lambda model, data, sensitive=(): REFUSING[data.site].copy())
    out = run_local(refusing_config, tmp_path / "l")
    _check_refusing(out.run_dir)
