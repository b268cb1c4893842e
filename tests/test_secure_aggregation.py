"""Secure aggregation of model updates on the tiny sample cohort (the real fusion sites).

Three secured rounds of the in-process federation, every message recorded: each round's model
equals plain FedAvg of the same sites' updates within the stated bound (``2**-25`` per value
plus one float32 rounding), and no array the server received correlates with any site's plain
update (|corr| < 0.05), while the same check finds the update in a plain round's reply.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from multimodal_fl.config import ExperimentConfig, SitePolicy, load_config
from multimodal_fl.engines.federated import inprocess_federation, run_config
from multimodal_fl.engines.registry import preflight
from multimodal_fl.federated.aggregation import aggregate
from multimodal_fl.federated.protocol import Kind, Reply, Request, SiteRefused, StateDict
from multimodal_fl.federated.secure_update import SecureAggregation, summed_keys
from multimodal_fl.federated.server import run_federated
from multimodal_fl.federated.site import FusionSite, fusion_sites
from multimodal_fl.training import SiteData, load_site_data
from tests.conftest import write_tiny_config
from tests.egress import (
    Crossing,
    Recorder,
    correlations,
    held_vector,
    long_arrays,
    plain_update,
    secured_update_findings,
)

ROUNDS = 3


@dataclass
class Secured:
    """The recorded secured run and what the checks need."""

    cfg: ExperimentConfig
    data: dict[str, SiteData]
    root: Path
    start: StateDict
    rounds: list[StateDict]
    crossings: list[Crossing]
    history: list


def _initial(cfg: ExperimentConfig, data: dict[str, SiteData], root: Path) -> StateDict:
    site = FusionSite("site_a", cfg, data["site_a"], run_dir=root / "init")
    return dict(site.handle(Request(Kind.INIT, 0)).weights)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path
            ) -> Secured:
    root = tmp_path_factory.mktemp("secure_aggregation")
    cfg = load_config(write_tiny_config(
        root, tiny_sample, tiny_bert, "covid_oxygen",
        federated={"rounds": ROUNDS, "local_steps": 3, "min_sites": 3,
                   "secure_aggregation": True}))
    data = load_site_data(cfg, root / "prep")
    start = _initial(cfg, data, root)
    recorder = Recorder(inprocess_federation(cfg, root / "run", data=data))
    seen: list[StateDict] = []
    config = run_config(cfg)
    assert config.secure == SecureAggregation(clip=64.0)
    result = run_federated(recorder, start, config, on_round=lambda r, w: seen.append(w))
    return Secured(cfg, data, root, start, seen, recorder.crossings, result.history)


def _plain(s: Secured, weights: StateDict, rnd: int) -> tuple[StateDict, list[Reply]]:
    """Plain FedAvg of fresh sites' updates from ``weights`` in round ``rnd`` (same seed)."""
    sites = fusion_sites(s.cfg, s.root / f"plain{rnd}", data=s.data)
    fit = dict(run_config(s.cfg).fit_config, seed=s.cfg.seed, proximal_mu=0.0, fedbn=False)
    replies = [sites[n].handle(Request(Kind.FIT, rnd, dict(weights), dict(fit)))
               for n in sorted(sites)]
    return aggregate(replies, weights), replies


def test_secured_rounds_equal_plain_fedavg_within_the_stated_bound(secured: Secured) -> None:
    bound = SecureAggregation().error_bound
    starts = [secured.start, *secured.rounds[:-1]]
    assert len(secured.rounds) == ROUNDS
    for rnd, (start, secure) in enumerate(zip(starts, secured.rounds, strict=True), start=1):
        plain, replies = _plain(secured, start, rnd)
        assert [r.site for r in replies] == secured.history[rnd - 1].replied
        worst = 0.0
        for key, value in start.items():
            if not np.issubdtype(value.dtype, np.floating):  # num_batches_tracked: not summed
                np.testing.assert_array_equal(secure[key], value)
                continue
            want = plain.get(key, value).astype(np.float64)
            gap = np.abs(secure[key].astype(np.float64) - want)
            assert (gap <= bound + np.spacing(np.abs(want).astype(value.dtype))).all(), key
            worst = max(worst, float(gap.max()))
        assert 0 < worst  # quantised: not bit for bit, but within the bound
        moved = sum(float(np.abs(secure[k] - start[k]).sum()) for k in summed_keys(start))
        assert moved > 1e-3  # the rounds trained


def _plain_update(s: Secured, rnd: int) -> dict[str, np.ndarray]:
    """Each site's plain delta from the round's start, flattened in the summed keys' order."""
    start = [s.start, *s.rounds][rnd - 1]
    _, replies = _plain(s, start, rnd)
    keys = summed_keys(start)
    return {r.site: np.concatenate([(r.weights[k].astype(np.float64) - start[k]).ravel()
                                    if k in r.weights else np.zeros(start[k].size)
                                    for k in keys]) for r in replies}


def test_no_array_the_server_receives_correlates_with_a_sites_plain_update(
    secured: Secured,
) -> None:
    rounds = [c for c in secured.crossings if c.request.kind in (Kind.FIT, Kind.SECURE_SUM)]
    assert {c.request.kind for c in rounds} == {Kind.FIT, Kind.SECURE_SUM}
    fits = [c.answer for c in rounds if c.request.kind == Kind.FIT]
    assert all(isinstance(r, Reply) and not r.weights and not r.arrays and not r.group_counts
               and not r.metrics for r in fits)
    checked = 0
    for rnd in range(1, ROUNDS + 1):
        updates = _plain_update(secured, rnd)
        assert min(u.size for u in updates.values()) > 50_000
        arrays = [a for c in rounds if c.request.round == rnd for a in long_arrays(c)]
        assert len(arrays) == len(updates)  # the masked vectors: one per site
        for (name, site), corr in correlations(arrays, updates).items():
            assert abs(corr) < 0.05, (rnd, name, site, corr)
            checked += 1
    assert checked == ROUNDS * 3 * 3


def test_the_correlation_check_finds_the_update_in_a_plain_round(secured: Secured) -> None:
    """The negative control: a plain fit reply's weights correlate with the site's update."""
    start = secured.start
    _, replies = _plain(secured, start, 1)
    keys = summed_keys(start)
    updates = _plain_update(secured, 1)
    for reply in replies:
        weights = np.concatenate([(reply.weights[k].astype(np.float64) - start[k]).ravel()
                                  if k in reply.weights else np.zeros(start[k].size)
                                  for k in keys])
        corr = correlations([("weights", weights)], {reply.site: updates[reply.site]})
        assert next(iter(corr.values())) > 0.99


def test_the_secured_update_check_passes_the_run_and_finds_an_unmasked_vector(
    secured: Secured,
) -> None:
    """``secured_update_findings`` (the Flower experiment test's check) on this run: nothing;
    with a site's masks gone (its masked vector is the vector it held) or a fit reply in the
    clear, it finds the update."""
    fits = [c for c in secured.crossings if c.request.kind == Kind.FIT and c.request.round == 1]
    sites = fusion_sites(secured.cfg, secured.root / "replay", data=secured.data)
    updates = {1: {c.site: plain_update(sites[c.site], c.request) for c in fits}}
    assert secured_update_findings(secured.crossings, updates) == []

    def leaked(y: np.ndarray) -> list[Crossing]:  # site_a's masked vector replaced by y
        return [replace(c, answer=replace(c.answer, arrays={"y": y}))
                if c.site == "site_a" and c.request.config.get("step") == "masked"
                and isinstance(c.answer, Reply) else c for c in secured.crossings]

    delta, parts = updates[1]["site_a"]
    found = secured_update_findings(leaked(held_vector(parts)), updates)  # its masks gone
    # (the sites' updates share a direction, so it correlates with theirs as well: also found)
    assert {"round 1: site_a secure_sum masked arrays/y equals site_a's unmasked vector",
            "round 1: site_a secure_sum masked arrays/y correlates with site_a's unmasked vector "
            "(+1.000)"} <= set(found), found
    quantised = np.rint(delta * SecureAggregation().scale).astype(np.int64)  # no offset, no mask
    found = secured_update_findings(leaked(quantised), updates)
    assert any(f.startswith("round 1: site_a secure_sum masked arrays/y correlates with "
                            "site_a's plain update") for f in found), found
    plain = replace(fits[0], answer=_plain(secured, secured.start, 1)[1][0])
    found = secured_update_findings([plain], {})
    assert found and found[0].startswith("site_a fit round 1: a secured fit reply carries")


def test_a_site_whose_policy_requires_it_refuses_a_plain_fit(secured: Secured) -> None:
    site = FusionSite("site_a", secured.cfg, secured.data["site_a"],
                      run_dir=secured.root / "policy", policy=SitePolicy(secure_aggregation=True))
    fit = dict(run_config(secured.cfg).fit_config, seed=0)
    with pytest.raises(SiteRefused, match="site policy requires secure aggregation"):
        site.handle(Request(Kind.FIT, 1, dict(secured.start), dict(fit)))
    secure = dict(fit, **SecureAggregation().to_config())
    reply = site.handle(Request(Kind.FIT, 1, dict(secured.start), secure))
    assert reply.n_samples > 0 and not reply.weights


def test_secure_aggregation_with_two_sites_is_refused_before_any_data_is_read(
    secured: Secured,
) -> None:
    two = secured.cfg.model_copy(update={"sites": secured.cfg.sites[:2]})
    with pytest.raises(ValueError, match="secure_aggregation: true needs at least 3 sites, "
                                         "the config lists 2"):
        preflight(two, "inprocess")
    preflight(two, "local")  # no fit rounds: nothing to secure
