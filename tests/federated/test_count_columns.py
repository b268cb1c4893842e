"""A 0/1 column's count, read off the ``moments`` and ``pca`` replies of a site.

The ``moments`` rule hid a feature seen in fewer than ``min_cell`` patients, but a 0/1 feature
(a condition, a medication, a missing-value indicator, a sex) is seen in every patient: its
``sum`` is the number of patients with the condition, sent as it was. A red team read diabetes
4 and COPD 3 at a 47-patient site under ``min_cell`` 10 off a training run; the task is the
server's, so any diagnosis code could be made a feature: a count oracle. ``mmfl pca --features
tabular`` sent the same count as its ``mean`` (times ``n``, once the pooled standardisation the
server itself sent is undone). The adversary here reads every ``moments``, ``pca`` and
``pca_scores`` reply of a site whose 40 training patients hold 3 of a condition, and tries
``sum``, ``n - sum`` and the de-standardised ``mean * n`` of each.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.federated import site as site_module
from multimodal_fl.federated.protocol import Kind, Reply, Request, SiteError
from multimodal_fl.federated.site import FusionSite
from multimodal_fl.moments import standardization
from multimodal_fl.pca.site import STANDARDIZE_MEAN, STANDARDIZE_SCALE
from multimodal_fl.training import CohortDataset, SiteData, load_site_data
from tests.conftest import write_tiny_config

torch.set_num_threads(1)

MIN_CELL = 10
N_TRAIN = 40
#: The condition's column: ``diabetes`` of the task.
CONDITION = "diabetes"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path
         ) -> tuple[ExperimentConfig, SiteData]:
    """The tiny COVID-19 config at min_cell 10 and its largest site, prepared once."""
    root = tmp_path_factory.mktemp("count_columns")
    cfg = load_config(write_tiny_config(root, tiny_sample, tiny_bert))
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
        update={"min_cell": MIN_CELL})})
    sites = load_site_data(cfg, root / "prep")
    return cfg, max(sites.values(), key=lambda d: len(d.dataset))


def _with_condition(data: SiteData, cases: int) -> tuple[SiteData, int]:
    """The site tiled to 40 training patients (and 10 others), ``cases`` of them with the
    condition (a 0/1 column, no missing value; none of the others has it)."""
    ds = data.dataset
    copies = -(-(N_TRAIN + 10) // len(ds))
    ids = [f"{p}~{k}" for k in range(copies) for p in ds.patient_ids][:N_TRAIN + 10]
    n = len(ids)
    inputs = {m: torch.cat([t] * copies)[:n].clone() for m, t in ds.inputs.items()}
    meta = pd.concat([ds.meta] * copies, ignore_index=True).iloc[:n].assign(patient_id=ids)
    mask = torch.cat([ds.mask] * copies)[:n]
    j = ds.modalities.index("tabular")
    assert bool(mask[:, j].all()), "every tiled patient has tabular features"
    col = list(data.feature_names).index(CONDITION)
    column = torch.zeros(n, dtype=inputs["tabular"].dtype)
    column[:cases] = 1.0
    inputs["tabular"][:, col] = column
    new = CohortDataset(ids, torch.cat([ds.labels] * copies)[:n].numpy(), inputs, mask,
                        ds.modalities, meta=meta, precomputed=ds.precomputed)
    splits = {p: "train" if i < N_TRAIN else "val" if i < N_TRAIN + 5 else "test"
              for i, p in enumerate(ids)}
    tiled = SiteData(data.site, new, splits, list(data.feature_names), dict(data.dropped),
                     dict(data.image_errors), notes=list(data.notes))
    return tiled, col


def _replies(cfg: ExperimentConfig, data: SiteData, tmp_path: Path, col: int
             ) -> dict[str, Reply]:
    """Every reply of the moments and PCA kinds, as ``mmfl train`` and ``mmfl pca`` ask them;
    the standardisation the server sends is pooled from the released moments (one site)."""
    site = FusionSite(data.site, cfg, data, run_dir=tmp_path)
    out = {"moments/train": site.handle(Request(Kind.MOMENTS, 0)),
           "moments/all": site.handle(Request(Kind.MOMENTS, 0, config={"split": "all"}))}
    m = out["moments/all"].arrays
    mean, scale = standardization(m["n"], m["sum"], m["sumsq"])
    std = {STANDARDIZE_MEAN: mean, STANDARDIZE_SCALE: scale}
    for split in ("train", "all"):
        out[f"pca/{split}"] = site.handle(Request(
            Kind.PCA, 0, arrays=std, config={"modality": "tabular", "split": split}))
    d = mean.size
    one_hot = {"mean": np.zeros(d), "components": np.eye(1, d, col), "scale": np.ones(1)}
    out["pca_scores/train"] = site.handle(Request(
        Kind.PCA_SCORES, 0, arrays={**std, **one_hot, "edges": np.linspace(-3, 3, 7)[None, :],
                                    "levels": np.array([0.5])},
        config={"modality": "tabular", "split": "train"}))
    out["std"] = Reply(site=data.site, kind=Kind.PCA_APPLY, round=0, arrays=std)
    return out


def recovered(replies: dict[str, Reply], col: int) -> dict[str, float]:
    """Every count of the column the adversary reads off the replies, by where it read it:
    ``sum`` and ``n - sum`` of the moments, ``n * (mean * scale + pooled mean)`` of each PCA
    summary and score summary, and its complement."""
    std = replies["std"].arrays
    mu, sd = float(std[STANDARDIZE_MEAN][col]), float(std[STANDARDIZE_SCALE][col])
    out: dict[str, float] = {}
    for where in ("moments/train", "moments/all"):
        a = replies[where].arrays
        out[f"{where}/sum"] = float(a["sum"][col])
        out[f"{where}/n-sum"] = float(a["n"][col] - a["sum"][col])
    for where in ("pca/train", "pca/all"):
        a = replies[where].arrays
        n = int(a["n"])
        count = n * (float(a["mean"][col]) * sd + mu)
        out[f"{where}/mean*n"], out[f"{where}/n-mean*n"] = count, n - count
    scores = replies["pca_scores/train"].document("pca_scores")
    n = int(scores["n"])
    count = n * (float(scores["mean"][0]) * sd + mu)
    out["pca_scores/train/mean*n"], out["pca_scores/train/n-mean*n"] = count, n - count
    return out


def _suppressed(run_dir: Path, site: str) -> dict[str, list[list[int]]]:
    """Per kind, per released reply, the feature indices its egress-log lines name."""
    out: dict[str, list[list[int]]] = {}
    for line in (run_dir / "sites" / site / "egress.jsonl").read_text().splitlines():
        entry = json.loads(line)
        cols = [int(i) for text in entry.get("suppressed") or []
                for i in re.findall(r"\d+", text.split("]")[0])]
        out.setdefault(entry["kind"], []).append(cols)
    return out


def _found(counts: dict[str, float], value: int) -> list[str]:
    return sorted(w for w, c in counts.items() if abs(c - value) < 1e-6)


def test_a_condition_of_3_training_patients_in_40_is_read_off_no_reply(
    tiny: tuple[ExperimentConfig, SiteData], tmp_path: Path
) -> None:
    """3 of 40 (and 37 without) under min_cell 10: every reply sends the column as unseen."""
    cfg, data = tiny
    rare, col = _with_condition(data, 3)
    replies = _replies(cfg, rare, tmp_path, col)
    counts = recovered(replies, col)
    assert _found(counts, 3) == [] and _found(counts, N_TRAIN - 3) == []
    assert not [w for w, c in counts.items() if 0.5 < c < MIN_CELL - 0.5]
    for where in ("moments/train", "moments/all"):
        a = replies[where].arrays
        assert (a["n"][col], a["sum"][col], a["sumsq"][col]) == (0, 0, 0)
    for where in ("pca/train", "pca/all"):
        a = replies[where].arrays
        assert a["mean"][col] == 0 and not np.asarray(a["block"])[:, col].any()
    said = _suppressed(tmp_path, rare.site)
    assert [col in cols for cols in said["moments"]] == [True, True]
    assert [col in cols for cols in said["pca"]] == [True, True]


def test_a_condition_of_15_training_patients_in_40_still_leaves(
    tiny: tuple[ExperimentConfig, SiteData], tmp_path: Path
) -> None:
    """Twin (non-vacuity): 15 of 40 is released, and the same adversary reads it everywhere."""
    cfg, data = tiny
    common, col = _with_condition(data, 15)
    counts = recovered(_replies(cfg, common, tmp_path, col), col)
    assert _found(counts, 15) == ["moments/all/sum", "moments/train/sum",
                                  "pca/all/mean*n", "pca/train/mean*n",
                                  "pca_scores/train/mean*n"]


def test_a_pca_builder_that_forgets_the_rule_gets_no_count_past_the_gate(
    tiny: tuple[ExperimentConfig, SiteData], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate's backstop: a PCA summary that shows the 3 (its builder ignores ``min_cell``)
    is withheld, checked against the site's own rows."""
    cfg, data = tiny
    rare, _ = _with_condition(data, 3)
    forgetful = site_module.site_matrix
    monkeypatch.setattr(site_module, "site_matrix",
                        lambda *a, **k: forgetful(*a, **{**k, "min_cell": 0}))
    site = FusionSite(rare.site, cfg, rare, run_dir=tmp_path)
    d = len(rare.feature_names)
    std = {STANDARDIZE_MEAN: np.zeros(d), STANDARDIZE_SCALE: np.ones(d)}
    with pytest.raises(SiteError, match="disclosure rules"):
        site.handle(Request(Kind.PCA, 0, arrays=std, config={"modality": "tabular"}))
    assert "which the site withholds" in next(
        line for line in (tmp_path / "sites" / rare.site / "egress.jsonl").read_text()
        .splitlines() if '"pca"' in line)


def test_the_moments_rule_hides_a_small_count_or_complement_of_any_0_1_column() -> None:
    """The rule on its own: recognised from the reply (sum == sumsq, an integer)."""
    from multimodal_fl.config import SitePolicy
    from multimodal_fl.federated.disclosure import RULES

    n = np.array([40, 40, 40, 40, 40, 4])
    s = np.array([3.0, 37.0, 15.0, 0.0, 40.0, 2.0])
    q = np.array([3.0, 37.0, 15.0, 0.0, 40.0, 2.0])
    s_cont, q_cont = np.array([3.5]), np.array([7.25])  # not 0/1: its sum counts nothing
    reply = Reply(site="a", kind=Kind.MOMENTS, round=0, n_samples=40, arrays={
        "n": np.concatenate([n, [40]]), "sum": np.concatenate([s, s_cont]),
        "sumsq": np.concatenate([q, q_cont])})
    released = RULES[Kind.MOMENTS](reply, MIN_CELL, SitePolicy())
    assert released.reply.arrays["n"].tolist() == [0, 0, 40, 40, 40, 0, 40]
    assert released.reply.arrays["sum"].tolist() == [0, 0, 15, 0, 40, 0, 3.5]
    assert released.suppressed == [
        f"features [5]: seen in fewer than {MIN_CELL} patients: sent as unseen (n=0, sum=0, "
        "sumsq=0)",
        f"features [0, 1]: 0/1 with fewer than {MIN_CELL} patients of a value: sent as unseen "
        "(n=0, sum=0, sumsq=0)"]
