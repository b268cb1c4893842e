"""Differencing over a whole run: every count one site sends, against its hidden splits.

A site's disclosed document hid its training count by complementary suppression while every
``fit`` sent it (FedAvg weights by it) and ``predict`` sent the total: total minus training was
its small validation and test splits together. The adversary here holds every count the site
sends in a run, of every request kind, and tries every sum and difference of them.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.federated.disclosure import DECLARED
from multimodal_fl.federated.protocol import Doc, Kind, Reply, Request
from multimodal_fl.federated.site import FusionSite
from multimodal_fl.training import SiteData, load_site_data
from tests.conftest import write_tiny_config

torch.set_num_threads(1)

MIN_CELL = 5
#: The cells a count of a site's patients may cover: (split, class).
CELLS = [(s, c) for s in ("train", "val", "test") for c in ("pos", "neg")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path
         ) -> tuple[ExperimentConfig, SiteData]:
    """The tiny COVID-19 config at min_cell 5 and its largest site, prepared once."""
    root = tmp_path_factory.mktemp("split_differencing")
    cfg = load_config(write_tiny_config(root, tiny_sample, tiny_bert))
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
        update={"min_cell": MIN_CELL})})
    sites = load_site_data(cfg, root / "prep")
    return cfg, max(sites.values(), key=lambda d: len(d.dataset))


def _resplit(data: SiteData, n_val: int, n_test: int) -> SiteData:
    """The site with ``n_val`` validation and ``n_test`` test patients, the rest training."""
    ids = list(data.dataset.patient_ids)
    splits = {p: "val" if i < n_val else "test" if i < n_val + n_test else "train"
              for i, p in enumerate(ids)}
    return dataclasses.replace(data, splits=splits, _parts={})


def _cell(split: str | None = None, cls: str | None = None) -> tuple[int, ...]:
    """The indicator vector over :data:`CELLS` of a count (None: every split or class)."""
    return tuple(int((split in (None, s)) and (cls in (None, c))) for s, c in CELLS)


def _run_site(cfg: ExperimentConfig, data: SiteData, tmp_path: Path
              ) -> tuple[dict[str, Reply], str]:
    """Every request kind of a run, answered by one site through its gate."""
    site = FusionSite(data.site, cfg, data, run_dir=tmp_path)
    fit = {"seed": 0, "local_steps": 2, "lr": 1e-3}
    out: dict[str, Reply] = {}
    out["pca"] = site.handle(Request(Kind.PCA, 0, config={"modality": "text"}))
    d = int(np.asarray(out["pca"].arrays["mean"]).size)
    projection = {"mean": np.asarray(out["pca"].arrays["mean"], dtype=np.float64),
                  "components": np.eye(1, d), "scale": np.ones(1)}
    out["pca_scores"] = site.handle(Request(
        Kind.PCA_SCORES, 0, config={"modality": "text"},
        arrays={**projection, "edges": np.linspace(-3, 3, 7)[None, :],
                "levels": np.array([0.5])}))
    out["info"] = site.handle(Request(Kind.INFO, 0))
    out["init"] = site.handle(Request(Kind.INIT, 0))
    out["moments"] = site.handle(Request(Kind.MOMENTS, 0))
    weights = out["init"].weights
    out["fit"] = site.handle(Request(Kind.FIT, 1, weights=weights, config=dict(fit)))
    weights = out["fit"].weights
    out["evaluate"] = site.handle(Request(Kind.EVALUATE, 1, weights=weights))
    out["calibrate"] = site.handle(Request(Kind.CALIBRATE, 1, weights=weights))
    out["predict"] = site.handle(Request(Kind.PREDICT, 1, weights=weights))
    out["local_train"] = site.handle(Request(Kind.LOCAL_TRAIN, 0))
    out["cross_evaluate"] = site.handle(Request(Kind.CROSS_EVALUATE, 0,
                                                config={"model_site": data.site}))
    return out, data.site


def released_counts(replies: dict[str, Reply]) -> list[tuple[str, tuple[int, ...], int]]:
    """Every count of the site's patients by split and class that left, with its cells.

    ``n_samples`` of ``info``, ``init``, ``fit`` and ``local_train`` (training), ``evaluate``
    (validation) and its histograms' positives and negatives, ``predict`` (every patient),
    ``cross_evaluate`` (test); the documents' split, total and test-cell counts. The counts of
    ``moments``, ``pca`` and ``pca_scores`` are of the training patients with a modality, a
    different partition: they are listed by :func:`test_the_adversary_holds_every_kind`.
    """
    out: list[tuple[str, tuple[int, ...], int]] = []

    def add(where: str, cell: tuple[int, ...], value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            out.append((where, cell, value))

    for kind, split in (("info", "train"), ("init", "train"), ("fit", "train"),
                        ("local_train", "train"), ("evaluate", "val"), ("predict", None),
                        ("cross_evaluate", "test")):
        if replies[kind].n_samples:  # 0: nothing said (a split of no patients is not sent)
            add(f"{kind}/n_samples", _cell(split), replies[kind].n_samples)
    if Doc.VALIDATION in replies["evaluate"].documents:
        validation = replies["evaluate"].document(Doc.VALIDATION)
        for cls in ("pos", "neg"):
            add(f"evaluate/{cls}", _cell("val", cls), int(sum(validation[cls]["count"])))
    local = replies["local_train"].document(Doc.LOCAL_TRAINING)
    add("local_training/n_samples", _cell("train"), local["n_samples"])
    predict = replies["predict"]
    site_doc = predict.document(Doc.SITE_METRICS)
    add("site_metrics/n_patients", _cell(), site_doc["n_patients"])
    add("site_metrics/n_positive", _cell(None, "pos"), site_doc["n_positive"])
    for split, values in site_doc["metrics"].items():
        for metric, v in values.items():
            add(f"site_metrics/{split}/{metric}/n", _cell(split), v.get("n"))
    disclosed = predict.document(Doc.DISCLOSED)
    for split, summary in disclosed["splits"].items():
        add(f"disclosed/{split}/n", _cell(split), summary["n"])
        add(f"disclosed/{split}/n_pos", _cell(split, "pos"), summary["n_pos"])
    for row in disclosed["cells"]:
        if row["scope"] == "site":
            add("disclosed/cells/n", _cell("test"), row["n"])
            add("disclosed/cells/n_pos", _cell("test", "pos"), row["n_pos"])
            add("disclosed/cells/n_neg", _cell("test", "neg"), row["n_neg"])
    return out


def derived_small_cells(released: list[tuple[str, tuple[int, ...], int]], min_cell: int
                        ) -> dict[tuple[int, ...], int]:
    """Every count of patients some sum or difference of released counts gives, in (0, m).

    The adversary takes each distinct released count once and tries every combination with
    coefficients -1, 0 and 1; a combination whose cells add up to a set of cells (each 0 or 1)
    is that set's count of patients.
    """
    known: dict[tuple[int, ...], int] = {}
    for _, cell, value in released:
        assert known.setdefault(cell, value) == value  # one set of patients, one count
    cells = np.array(list(known), dtype=np.int64)
    values = np.array(list(known.values()), dtype=np.int64)
    combos = np.array(list(itertools.product((-1, 0, 1), repeat=len(values))), dtype=np.int64)
    sets = combos @ cells
    counts = combos @ values
    ok = np.all((sets == 0) | (sets == 1), axis=1) & (sets.sum(axis=1) > 0)
    small = ok & (counts > 0) & (counts < min_cell)
    return {tuple(int(x) for x in s): int(c) for s, c in zip(sets[small], counts[small],
                                                              strict=True)}


def test_no_sum_or_difference_of_a_sites_counts_gives_its_small_splits(
    tiny: tuple[ExperimentConfig, SiteData], tmp_path: Path
) -> None:
    """Validation 2 and test 2 under min_cell 5: the site trains (the training count leaves with
    every fit), so its total would give the 4; it is withheld everywhere, and the rest stays."""
    cfg, data = tiny
    small = _resplit(data, 2, 2)
    n, n_train = len(small.dataset), len(small.train)
    assert n_train >= MIN_CELL
    replies, _ = _run_site(cfg, small, tmp_path)
    released = released_counts(replies)
    assert ("fit/n_samples", _cell("train"), n_train) in released  # FedAvg weights by it
    assert derived_small_cells(released, MIN_CELL) == {}
    assert replies["predict"].n_samples == 0
    site_doc = replies["predict"].document(Doc.SITE_METRICS)
    assert site_doc["n_patients"] is None and site_doc["n_positive"] is None
    assert all(v is None for v in site_doc["modality_counts"].values())
    splits = replies["predict"].document(Doc.DISCLOSED)["splits"]
    assert splits["train"]["n"] == n_train  # public: not hidden to protect the others
    assert splits["val"]["n"] is None and splits["test"]["n"] is None
    egress = [json.loads(line) for line in
              (tmp_path / "sites" / small.site / "egress.jsonl").read_text().splitlines()]
    predicted = next(e for e in egress if e["kind"] == "predict")
    assert predicted["released"] and predicted["n_samples"] == 0
    assert n - n_train == 4


def test_the_attack_finds_the_small_splits_when_the_total_leaves(
    tiny: tuple[ExperimentConfig, SiteData], tmp_path: Path
) -> None:
    """Non-vacuity: the same adversary, given the total the site withholds, finds the 4."""
    cfg, data = tiny
    small = _resplit(data, 2, 2)
    replies, _ = _run_site(cfg, small, tmp_path)
    released = released_counts(replies)
    leaked = [*released, ("predict/n_samples", _cell(), len(small.dataset))]
    found = derived_small_cells(leaked, MIN_CELL)
    assert found.get(tuple(int(s != "train") for s, _ in CELLS)) == 4


def test_a_site_whose_splits_are_all_large_releases_its_counts(
    tiny: tuple[ExperimentConfig, SiteData], tmp_path: Path
) -> None:
    """Twin: every split holds min_cell or more: the total and each split's size leave."""
    cfg, data = tiny
    n = len(data.dataset)
    large = _resplit(data, MIN_CELL, MIN_CELL)
    assert len(large.train) >= MIN_CELL
    replies, _ = _run_site(cfg, large, tmp_path)
    released = released_counts(replies)
    assert derived_small_cells(released, MIN_CELL) == {}
    assert replies["predict"].n_samples == n
    site_doc = replies["predict"].document(Doc.SITE_METRICS)
    assert site_doc["n_patients"] == n
    splits = replies["predict"].document(Doc.DISCLOSED)["splits"]
    assert [splits[s]["n"] for s in ("train", "val", "test")] == [n - 2 * MIN_CELL, MIN_CELL,
                                                                  MIN_CELL]


def test_the_adversary_holds_every_kind(tiny: tuple[ExperimentConfig, SiteData],
                                        tmp_path: Path) -> None:
    """The run above answers every kind that sends a count: none is left out of the attack."""
    cfg, data = tiny
    replies, _ = _run_site(cfg, _resplit(data, 2, 2), tmp_path)
    # every kind whose reply is declared, but the acknowledgement and the masked vectors
    counting = set(DECLARED) - {Kind.PCA_APPLY, Kind.SECURE_SUM}
    assert {Kind(k) for k in replies} == counting
    assert replies["calibrate"].n_samples == 0  # it sends nothing but the acknowledgement
    # the other partition: training patients with text (pca) or tabular data (moments)
    n_train = replies["fit"].n_samples
    for kind in ("moments", "pca", "pca_scores"):
        assert MIN_CELL <= replies[kind].n_samples <= n_train


def _with_images_outside_training(data: SiteData, keep: int) -> SiteData:
    """``data`` with exactly ``keep`` of its patients outside training marked as holding an
    image (the mask is what every count reads)."""
    ds = copy.copy(data.dataset)
    ds.mask = data.dataset.mask.clone()
    j = list(ds.modalities).index("image")
    outside = [i for i, p in enumerate(ds.patient_ids) if data.splits[p] != "train"]
    for rank, i in enumerate(outside):
        ds.mask[i, j] = rank < keep
    return dataclasses.replace(data, dataset=ds, _parts={})


def _image_counts(data: SiteData, cfg: ExperimentConfig, tmp_path: Path
                  ) -> tuple[int, int | None]:
    """The training patients with an image as ``fit`` sends them, and the site's total with an
    image as ``predict`` sends it."""
    site = FusionSite(data.site, cfg, data, run_dir=tmp_path)
    init = site.handle(Request(Kind.INIT, 0))
    fit = site.handle(Request(Kind.FIT, 1, weights=init.weights,
                              config={"seed": 0, "local_steps": 2, "lr": 1e-3}))
    predict = site.handle(Request(Kind.PREDICT, 1, weights=fit.weights))
    counts = predict.document(Doc.SITE_METRICS)["modality_counts"]
    return fit.group_counts["encoders.image."], counts["image"]


def test_a_modality_count_minus_its_training_count_gives_no_small_cell(
    tiny: tuple[ExperimentConfig, SiteData], tmp_path: Path
) -> None:
    """Every fit sends the training patients with an image (its group counts); the site's
    total with an image, minus it, was the patients outside training with one: 1 of 10 here,
    under min_cell 5 (a review). The total is now withheld; with every such cell large it
    leaves (twin)."""
    cfg, data = tiny
    few = _with_images_outside_training(_resplit(data, MIN_CELL, MIN_CELL), keep=1)
    in_training = int(few.train.modality_counts()["image"])
    assert in_training >= MIN_CELL
    sent, total = _image_counts(few, cfg, tmp_path / "few")
    assert sent == in_training  # the count the adversary subtracts
    assert total is None
    many = _with_images_outside_training(_resplit(data, MIN_CELL, MIN_CELL), keep=MIN_CELL)
    sent, total = _image_counts(many, cfg, tmp_path / "many")
    assert total is not None and total - sent == MIN_CELL
