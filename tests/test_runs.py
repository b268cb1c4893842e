"""runs: run-directory layout of the local and centralized engines, determinism, preparation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from multimodal_fl.config import ExperimentConfig, SiteConfig, load_task
from multimodal_fl.engines.baselines import CENTRALIZED_WARNING, run_centralized, run_local
from multimodal_fl.rundir import default_run_dir
from multimodal_fl.training import FrozenEncoders, build_model, prepare_site_data
from tests.smallcells import small_figures
from tests.test_training import make_table

torch.set_num_threads(1)

SITES = ("site_a", "site_b")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
         *"the patient has fever cough oxygen note low high".split()]


@dataclass
class FakeCohort:
    """Shaped like data.cohort.SiteCohort."""

    site: str
    table: pd.DataFrame
    feature_names: list[str]


def tiny_text_model(folder: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt"), model_max_length=32).save_pretrained(
        str(folder))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=16,
                         max_position_embeddings=32)).save_pretrained(str(folder))
    return folder


def make_cohorts(root: Path) -> dict[str, FakeCohort]:
    """Two sites with PNG images (one missing file each), notes and tabular features."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = {}
    for k, site in enumerate(SITES):
        table, names = make_table(48, site=site, seed=k)
        d = root / site / "images"
        d.mkdir(parents=True)
        paths: list[str | None] = []
        for i, (pid, y) in enumerate(zip(table["patient_id"], table["label"], strict=True)):
            if i % 3 == 0:
                paths.append(None)
                continue
            arr = (rng.random((20, 20)) * 100 + y * 100).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{pid}.png")
            paths.append(str(d / f"{pid}.png"))
        paths[1] = str(d / "missing.png")
        table["image_path"] = paths
        table["has_image"] = [p is not None for p in paths]
        table["notes"] = [
            (["the patient has fever"] if y else ["low oxygen note"]) if t else []
            for t, y in zip(table["has_text"], table["label"], strict=True)
        ]
        out[site] = FakeCohort(site, table, names)
    return out


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExperimentConfig, dict[str, FakeCohort]]:
    root = tmp_path_factory.mktemp("runs")
    model_dir = tiny_text_model(root / "bert")
    cfg = ExperimentConfig.model_validate({
        "name": "tiny",
        "task": load_task("covid_oxygen_24h"),
        "sites": [SiteConfig(name=s, path=root / s) for s in SITES],
        "modalities": {
            "image": {"size": 16, "embed_dim": 8},
            "tabular": {"hidden": [8], "embed_dim": 8},
            "text": {"encoder": "local", "model_path": str(model_dir)},
        },
        "fusion": {"kind": "attention", "dim": 8, "heads": 2},
        "training": {"steps": 12, "batch_size": 16, "eval_every": 6, "device": "cpu"},
        "evaluation": {"n_boot": 20},
    })
    return cfg, make_cohorts(root)


def test_prepare_site_data_reads_images_once_and_embeds_notes(
    setup: tuple[ExperimentConfig, dict[str, FakeCohort]], tmp_path: Path
) -> None:
    cfg, cohorts = setup
    cohort = cohorts["site_a"]
    frozen = FrozenEncoders(cfg)
    sd = prepare_site_data(cohort, cfg, cache=tmp_path / "cache" / "site_a", frozen=frozen)
    ds = sd.dataset
    assert sd.site == "site_a" and len(ds) == len(cohort.table)
    assert ds.modalities == ("image", "tabular", "text") and ds.precomputed == ("text",)
    assert ds.inputs["image"].shape == (len(ds), 1, 16, 16)
    assert ds.inputs["text"].shape == (len(ds), 16)
    has_img = cohort.table["has_image"].to_numpy(dtype=bool)
    assert int(ds.mask[:, 0].sum()) == int(has_img.sum()) - 1  # the missing file is absent
    assert list(sd.image_errors) == ["site_a-p001"]
    text_rows = ds.mask[:, 2]
    assert (ds.inputs["text"][text_rows].abs().sum(1) > 0).all()
    assert (ds.inputs["text"][~text_rows] == 0).all()
    assert set(sd.splits) == set(ds.patient_ids)
    shards = sorted((tmp_path / "cache" / "site_a").glob("*/shard-*.npz"))
    assert len(shards) == 2  # one for the pixels, one for the text embeddings
    # second preparation comes from the cache (no new shard) and is identical
    again = prepare_site_data(cohort, cfg, cache=tmp_path / "cache" / "site_a", frozen=frozen)
    for m in ds.modalities:
        torch.testing.assert_close(again.dataset.inputs[m], ds.inputs[m], rtol=0, atol=0,
                                   equal_nan=True)
    assert sorted((tmp_path / "cache" / "site_a").glob("*/shard-*.npz")) == shards
    model = build_model(cfg, sd)
    assert {"encoders.image.", "encoders.tabular.", "proj.text."} <= set(model.parameter_groups())
    assert not any(n.startswith("encoders.text.") for n, _ in model.named_parameters())


def test_run_local_layout_and_same_seed_same_model(
    setup: tuple[ExperimentConfig, dict[str, FakeCohort]], tmp_path: Path
) -> None:
    cfg, cohorts = setup
    out = run_local(cfg, tmp_path / "r1", cohorts=cohorts)
    run = out.run_dir
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
    assert not (run / "model.safetensors").exists()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["federated"]["engine"] == "local" and resolved["seed"] == cfg.seed
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["engine"] == "local" and set(metrics["sites"]) == set(SITES)
    for site in SITES:
        sdir = run / "sites" / site
        state = load_file(str(sdir / "model.safetensors"))
        assert any(k.startswith("encoders.image.") for k in state)
        splits = json.loads((sdir / "splits.json").read_text())
        pred = pd.read_csv(sdir / "predictions.csv")
        assert list(pred.columns[:4]) == ["patient_id", "split", "label", "score"]
        assert {"sex", "age_band", "age"} <= set(pred.columns)
        assert len(pred) == len(cohorts[site].table)
        assert dict(zip(pred["patient_id"], pred["split"], strict=True)) == splits["splits"]
        for split in ("train", "val", "test"):
            auc = metrics["sites"][site]["metrics"][split]["auc"]
            assert (auc["value"] is None) == (auc["reason"] is not None)
        assert metrics["history"][site], "validation history missing"
    # the same small-cell rule as a federated site's: no figure on fewer than min_cell (10)
    assert small_figures(metrics["sites"], 10) == []
    again = run_local(cfg, tmp_path / "r2", cohorts=cohorts)
    for site in SITES:
        a = (run / "sites" / site / "model.safetensors").read_bytes()
        b = (again.run_dir / "sites" / site / "model.safetensors").read_bytes()
        assert a == b, f"{site}: same seed gave different model bytes"
    a_ = (run / "sites" / "site_a" / "model.safetensors").read_bytes()
    b_ = (run / "sites" / "site_b" / "model.safetensors").read_bytes()
    assert a_ != b_


def test_run_centralized_warns_and_writes_one_model(
    setup: tuple[ExperimentConfig, dict[str, FakeCohort]], tmp_path: Path
) -> None:
    cfg, cohorts = setup
    # a threshold above the test splits' size (about 10 of 48): their figures are not shown
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"min_cell": 12})})
    said: list[str] = []
    out = run_centralized(cfg, tmp_path / "c", cohorts=cohorts, warn=said.append)
    assert said == [CENTRALIZED_WARNING] and "moves data" in CENTRALIZED_WARNING
    run = out.run_dir
    assert (run / "model.safetensors").is_file()
    assert not (run / "sites" / "site_a" / "model.safetensors").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["engine"] == "centralized" and set(metrics["history"]) == {"centralized"}
    counts = [json.loads((run / "sites" / s / "splits.json").read_text())["counts"]
              for s in SITES]
    # no all-sites total of patients either (training size, recalibration source): minus the
    # sites' released sizes it would give a site's hidden one
    assert "n_samples" not in metrics["training"]["centralized"] and counts
    assert not any(ch.isdigit() for ch in metrics["recalibration"].get("source", ""))
    # no all-sites figure from the patients' predictions (it would give a site's hidden test
    # size by subtraction): the all-sites figures are the histogram-pooled ones only
    assert "pooled" not in metrics and "pooled_from_histograms" in metrics
    assert small_figures(metrics["sites"], 12) == []
    assert all(d["metrics"]["test"]["auc"]["reason"] == "fewer than 12 patients"
               for d in metrics["sites"].values())
    for site in SITES:
        assert (run / "sites" / site / "predictions.csv").is_file()


def test_default_run_dir_is_name_and_timestamp(
    setup: tuple[ExperimentConfig, dict[str, FakeCohort]], tmp_path: Path
) -> None:
    cfg, _ = setup
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = default_run_dir(cfg, tmp_path, now=when)
    assert first == tmp_path / "tiny-20260102-030405"
    first.mkdir()
    assert default_run_dir(cfg, tmp_path, now=when) == tmp_path / "tiny-20260102-030405-2"


def test_centralized_run_warms_the_linear_path_up_first(
    setup: tuple[ExperimentConfig, dict[str, FakeCohort]], tmp_path: Path
) -> None:
    """``training.linear_warmup_steps`` on an engine: the run's training record says the
    warm-up ran before the steps, and the warmed-up model was validated (step 0) first."""
    cfg, cohorts = setup
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"linear_warmup_steps": 20})})
    out = run_centralized(cfg, tmp_path / "w", cohorts=cohorts, warn=lambda _: None)
    metrics = json.loads((out.run_dir / "metrics.json").read_text())
    record = metrics["training"]["centralized"]
    assert record["warmup_steps"] == 20 and record["warmup_loss"] is not None
    assert metrics["history"]["centralized"][0]["step"] == 0


def test_centralized_run_can_start_from_the_fitted_logistic_regression(
    setup: tuple[ExperimentConfig, dict[str, FakeCohort]], tmp_path: Path
) -> None:
    """``training.linear_warmup_fit`` on an engine: the record names the chosen penalty, and
    the fitted model was validated (step 0) before the steps."""
    cfg, cohorts = setup
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"linear_warmup_fit": True})})
    out = run_centralized(cfg, tmp_path / "f", cohorts=cohorts, warn=lambda _: None)
    metrics = json.loads((out.run_dir / "metrics.json").read_text())
    record = metrics["training"]["centralized"]
    assert record["warmup_fit_C"] > 0 and record["warmup_steps"] == 0
    assert metrics["history"]["centralized"][0]["step"] == 0
