"""Progress events (data preparation, site replies) and how the CLI shows them; the DICOM
orientation warning handled where the image is read."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from multimodal_fl.config import load_config
from multimodal_fl.data import build_cohorts
from multimodal_fl.federated.inprocess import InProcessFederation
from multimodal_fl.federated.protocol import Kind, Reply, Request
from multimodal_fl.progress import PrepareEvent, ProgressEvent, ReplyEvent, StepEvent
from multimodal_fl.progress_view import ProgressView, RoundClock, format_duration
from multimodal_fl.training import load_site_data


def _finals(events: list[ProgressEvent]) -> dict[tuple[str, str, str], PrepareEvent]:
    """The last event of each (site, modality, action)."""
    out: dict[tuple[str, str, str], PrepareEvent] = {}
    for e in events:
        if isinstance(e, PrepareEvent):
            out[(e.site, e.modality, e.action)] = e
    return out


def test_preparation_reports_each_site_and_modality_with_cache_hits(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    frozen_image = {"encoder": "smallcnn", "spatial_dims": 2, "size": 32, "frozen": True}
    cfg = load_config(tiny_config(modalities={"image": frozen_image}))
    cohorts = build_cohorts(cfg)
    expected: dict[tuple[str, str, str], int] = {}
    for site, cohort in cohorts.items():
        expected[(site, "image", "read")] = int(cohort.table["has_image"].sum())
        expected[(site, "image", "embedded")] = int(cohort.table["has_image"].sum())
        expected[(site, "text", "embedded")] = int(cohort.table["has_text"].sum())

    first: list[ProgressEvent] = []
    load_site_data(cfg, tmp_path, progress=first.append)
    finals = _finals(first)
    records = {k: e for k, e in finals.items() if k[1] == "records"}
    assert {k[0] for k in records} == set(cohorts)
    assert all(e.done == e.total > 0 for e in records.values())
    prepared = {k: e for k, e in finals.items() if k[1] != "records"}
    assert {k: (e.done, e.total) for k, e in prepared.items()} == {
        k: (n, n) for k, n in expected.items()
    }
    assert all(e.cache_hits == 0 for e in prepared.values())
    # the bar moves while images are read: one event per image after the start
    site_a_reads = [e.done for e in first if isinstance(e, PrepareEvent)
                    and (e.site, e.modality, e.action) == ("site_a", "image", "read")]
    assert site_a_reads[0] == 0 and site_a_reads == sorted(site_a_reads)
    assert len(set(site_a_reads)) == expected[("site_a", "image", "read")] + 1

    again: list[ProgressEvent] = []
    load_site_data(cfg, tmp_path, progress=again.append)  # the same cache (data.cache_dir)
    for key, e in _finals(again).items():
        if key[1] != "records":
            assert (e.done, e.total, e.cache_hits) == (expected[key],) * 3, key


def test_dicom_orientation_is_noted_once_per_site_not_warned(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = load_config(tiny_config())
    cohorts = build_cohorts(cfg)
    dicoms = {site: int(c.table["image_path"].astype(str).str.endswith(".dcm").sum())
              for site, c in cohorts.items()}
    assert dicoms["site_a"] > 0, "the tiny profile has DICOM images at site_a"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_site_data(cfg, tmp_path, cohorts=cohorts)
    shown = [str(w.message) for w in caught if "ImageOrientationPatient" in str(w.message)]
    assert shown == []
    for site, sd in data.items():
        notes = [n for n in sd.notes if "ImageOrientationPatient" in n]
        assert len(notes) == (1 if dicoms[site] else 0), (site, sd.notes)
        if dicoms[site]:
            assert notes[0].startswith(f"{dicoms[site]} DICOM file(s)")
            assert "no effect on 2D images" in notes[0]


def test_load_image_passes_other_warnings_and_notes_missing_geometry(
    tiny_sample: Path,
) -> None:
    from multimodal_fl.encoders.transforms import load_image

    dcm = sorted((tiny_sample / "covid_oxygen" / "site_a" / "images").glob("*.dcm"))[0]
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_image(dcm, size=16, notes=notes)
    assert notes == [str(dcm)]
    assert not any("ImageOrientationPatient" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match="ImageOrientationPatient"):  # no notes: MONAI's own
        load_image(dcm, size=16)


class _Site:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail = name, fail

    def handle(self, request: Request) -> Reply:
        if self.fail:
            raise RuntimeError("down")
        return Reply(site=self.name, kind=request.kind, round=request.round, n_samples=1)


def test_inprocess_federation_reports_each_reply_as_it_arrives() -> None:
    events: list[ProgressEvent] = []
    fed = InProcessFederation({"a": _Site("a"), "b": _Site("b", fail=True), "c": _Site("c")},
                              progress=events.append)
    answers = fed.broadcast({s: Request(Kind.FIT, 4) for s in ("a", "b", "c")})
    assert sorted(answers) == ["a", "b", "c"]
    assert events == [
        ReplyEvent("fit", 4, 0, 3),
        ReplyEvent("fit", 4, 1, 3, site="a"),
        ReplyEvent("fit", 4, 2, 3, site="b", ok=False),
        ReplyEvent("fit", 4, 3, 3, site="c"),
    ]


def test_round_clock_estimates_from_the_median_round() -> None:
    now = [0.0]
    clock = RoundClock(5, clock=lambda: now[0])
    clock.round_started(1)
    assert clock.seconds_left(1, 0, 4) is None
    now[0] = 10.0  # round 1: half the sites in 10 s -> 20 s a round, 5 rounds
    assert clock.seconds_left(1, 2, 4) == pytest.approx(10.0 + 4 * 20.0)
    for rnd, t in ((2, 30.0), (3, 40.0), (4, 80.0)):  # rounds of 30, 10, 40 s: median 30
        now[0] = t
        clock.round_started(rnd)
    now[0] = 90.0
    assert clock.seconds_left(4, 1, 4) == pytest.approx(20.0 + 30.0)
    assert format_duration(80) == "1m20s" and format_duration(45) == "45s"
    assert format_duration(7500) == "2h05m"


def test_view_prints_plain_lines_off_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with ProgressView(console, last_round=2) as view:
        assert view.bars is None
        for done in (0, 3, 5, 5):
            view(PrepareEvent("site_a", "image", "read", done, 5, cache_hits=3))
        view(ReplyEvent("fit", 1, 0, 2))
        view(ReplyEvent("fit", 1, 1, 2, site="a"))
        view(ReplyEvent("fit", 1, 2, 2, site="b", ok=False))
        view(ReplyEvent("evaluate", 1, 2, 2, site="b"))
        view(ReplyEvent("predict", 2, 2, 2, site="b"))
        view(StepEvent("local site_a", 6, 6, 0.5))
    lines = out.getvalue().splitlines()
    assert lines[0] == "site_a image read: 5 patients (3 from cache)"
    assert lines[1].startswith("round 1: 1/2 sites replied, ETA ~")
    assert lines[2].startswith("round 1: 2/2 sites replied, 1 failed")
    assert lines[3:] == ["predict: 2/2 sites replied", "local site_a: 6 steps, loss 0.500"]


def test_view_draws_bars_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with ProgressView(console, last_round=3) as view:
        assert view.bars is not None
        view(PrepareEvent("site_a", "text", "embedded", 2, 4, cache_hits=1))
        view(ReplyEvent("fit", 2, 0, 4))
        view(ReplyEvent("fit", 2, 1, 4, site="a"))
        tasks = {t.description: t for t in view.bars.tasks}
    assert "round 2: 1/4 sites replied" in out.getvalue()
    assert "━" in out.getvalue()
    assert tasks["round 2: 1/4 sites replied"].completed == 1
    assert tasks["site_a text embedded"].completed == 2
