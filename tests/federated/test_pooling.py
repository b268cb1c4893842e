"""Secure sums over a federation: the four steps as requests, the total equals the plain sum."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from multimodal_fl.federated.inprocess import InProcessFederation
from multimodal_fl.federated.pooling import REFUSED, SecureTotal, secure_total
from multimodal_fl.federated.protocol import Kind, Reply, Request
from multimodal_fl.federated.secure_sum import SecureSumError, SecureSumParty
from multimodal_fl.federated.site_state import SiteState, SiteStateError

RNG = np.random.default_rng(3)


class SumSite:
    """A site that holds one vector in parts and answers secure-sum steps (and counts them)."""

    def __init__(self, name: str, parts: Mapping[str, np.ndarray], *,
                 refusal: str | None = None, drop_at: str | None = None,
                 fresh: bool = False, state: Path | None = None,
                 grid: int | None = None) -> None:
        self.name = name
        # state: the site's policy's state_dir (kept across runs)
        self.state = None if state is None else SiteState(state, name)
        self.party = SecureSumParty(name, self.state)
        self.party.hold("v", parts, refusal=refusal, min_cell=5, grid=grid)
        self.drop_at = drop_at
        self.fresh = fresh  # rebuild the party from exported state for every message (Flower)
        self.seen: list[Request] = []
        self.sent: list[Reply] = []

    def handle(self, request: Request) -> Reply:
        assert request.kind == Kind.SECURE_SUM
        self.seen.append(request)
        if request.config["step"] == self.drop_at:
            raise ConnectionError("gone")
        if self.fresh:
            state = self.party.export_state()
            self.party = SecureSumParty(self.name, self.state)
            self.party.restore_state(state)
        try:
            reply = self.party.answer(request)
        except SecureSumError as exc:
            raise RuntimeError(str(exc)) from None
        self.sent.append(reply)
        return reply


def _parts(n_sites: int, names: tuple[str, ...] = ("overall", "sex=F", "sex=M"),
           width: int = 8) -> dict[str, dict[str, np.ndarray]]:
    return {f"s{i}": {p: RNG.integers(0, 50, width) for p in names} for i in range(n_sites)}


def _federation(parts: Mapping[str, Mapping[str, np.ndarray]], **kw: dict[str, object]
                ) -> tuple[InProcessFederation, dict[str, SumSite]]:
    sites = {n: SumSite(n, p, **kw.get(n, {})) for n, p in parts.items()}  # type: ignore[arg-type]
    return InProcessFederation(sites), sites


@pytest.mark.parametrize("fresh", [False, True])
def test_secure_total_equals_the_plain_sum(fresh: bool) -> None:
    parts = _parts(4)
    parts["s3"].pop("sex=M")  # a site without a part lays out zeros there
    federation, sites = _federation(parts, **{n: {"fresh": fresh} for n in parts})
    total = secure_total(federation, sorted(sites), "v")
    assert total.refused is None and total.sites == sorted(sites)
    for part in ("overall", "sex=F", "sex=M"):
        expected = sum(p[part] for p in parts.values() if part in p)
        np.testing.assert_array_equal(total.parts[part], expected)
    assert total.contributors["sex=M"] == ["s0", "s1", "s2"]
    assert total.min_cell == 5
    # what each site sent at the masked step is not its vector
    for name, site in sites.items():
        y = next(r.arrays["y"] for r in site.sent if "y" in r.arrays)
        plain = np.concatenate([parts[name].get(p, np.zeros(8, int))
                                for p in ("overall", "sex=F", "sex=M")])
        assert not np.array_equal(y, plain) and y.max() > 2**30


def test_a_site_dropping_after_sharing_its_keys_does_not_stop_the_sum() -> None:
    parts = _parts(4)
    federation, sites = _federation(parts, s1={"drop_at": "masked"})
    total = secure_total(federation, sorted(sites), "v")
    assert total.refused is None and total.sites == ["s0", "s2", "s3"]
    assert total.excluded["s1"].startswith("masked:")
    np.testing.assert_array_equal(
        total.parts["overall"], sum(parts[s]["overall"] for s in ("s0", "s2", "s3")))


def test_a_part_held_by_fewer_than_three_sites_is_left_out() -> None:
    parts = _parts(3)
    parts["s0"]["sex=unknown"] = np.ones(8, dtype=np.int64)
    federation, _ = _federation(parts)
    total = secure_total(federation, ["s0", "s1", "s2"], "v")
    assert "sex=unknown" not in total.parts
    assert "held by 1 site(s)" in total.left_out["sex=unknown"]


def test_two_sites_are_refused_with_the_reason_and_no_vector_is_sent() -> None:
    parts = _parts(3)
    federation, sites = _federation(parts, s2={"refusal": "fewer than 5 test patients"})
    total = secure_total(federation, sorted(sites), "v")
    assert total.refused is not None and total.refused.startswith(REFUSED)
    assert "2 took part" in total.refused and total.parts == {}
    assert "fewer than 5 test patients" in total.excluded["s2"]
    for site in sites.values():  # only the advertise step was asked; no vector left a site
        assert [r.config["step"] for r in site.seen] == ["advertise"]
        assert not any("y" in r.arrays for r in site.sent)


def test_a_site_refuses_to_unmask_for_fewer_than_three_senders() -> None:
    parts = _parts(4)
    federation, sites = _federation(parts, s1={"drop_at": "masked"}, s2={"drop_at": "masked"})
    total = secure_total(federation, sorted(sites), "v")
    assert total.refused is not None and "2 sent a masked vector" in total.refused
    assert all(r.config["step"] != "unmask" for s in sites.values() for r in s.seen)


@pytest.mark.parametrize("fresh", [False, True])
def test_a_second_sum_of_the_same_vector_over_other_sites_is_refused(fresh: bool) -> None:
    """The differencing attack: a total over four sites and then over three of them gives
    the fourth site's vector exactly. Each site refuses to unmask a vector it has already
    summed with a different set of sites, also when the same content is held again (a later
    request on the same weights); the same set again is answered (the same total)."""
    parts = _parts(4)
    federation, sites = _federation(parts, **{n: {"fresh": fresh} for n in parts})
    everyone = secure_total(federation, sorted(sites), "v")
    assert everyone.refused is None
    fewer = secure_total(federation, ["s0", "s1", "s2"], "v")
    assert fewer.refused is not None and fewer.parts == {}
    assert all("summed before" in fewer.excluded[s] for s in ("s0", "s1", "s2"))
    # the content held again under the same name: still refused
    for name in ("s0", "s1", "s2"):
        sites[name].party.hold("v", parts[name], min_cell=5)
    assert secure_total(federation, ["s0", "s1", "s2"], "v").parts == {}
    again = secure_total(federation, sorted(sites), "v")
    assert again.refused is None
    np.testing.assert_array_equal(again.parts["overall"], everyone.parts["overall"])
    # new content (another model's histograms) may be summed with any three sites
    for name in ("s0", "s1", "s2"):
        sites[name].party.hold("v", {p: v + 1 for p, v in parts[name].items()}, min_cell=5)
    other = secure_total(federation, ["s0", "s1", "s2"], "v")
    assert other.refused is None
    np.testing.assert_array_equal(other.parts["overall"],
                                  sum(parts[s]["overall"] + 1 for s in ("s0", "s1", "s2")))


@pytest.mark.parametrize("fresh", [False, True])
def test_a_state_dir_refuses_the_difference_across_runs(tmp_path: Path, fresh: bool) -> None:
    """The same attack over two runs: run 1 sums the vector over four sites, run 2 (new site
    objects, e.g. a rerun of the same config and seed, whose model and histograms come out
    identical) over three. Without a state directory run 2 is answered and the difference is
    the fourth site's vector exactly; with the sites' policies' ``state_dir`` it is refused.
    The same four again are answered (the same total)."""
    parts = _parts(4)
    first_run, _ = _federation(parts)
    everyone = secure_total(first_run, sorted(parts), "v")
    second_run, _ = _federation(parts)
    fewer = secure_total(second_run, ["s0", "s1", "s2"], "v")
    assert fewer.refused is None  # the leak, without a state directory
    np.testing.assert_array_equal(everyone.parts["overall"] - fewer.parts["overall"],
                                  parts["s3"]["overall"])

    kept = {n: {"state": tmp_path / n, "fresh": fresh} for n in parts}
    first_run, _ = _federation(parts, **kept)
    everyone = secure_total(first_run, sorted(parts), "v")
    assert everyone.refused is None
    second_run, _ = _federation(parts, **kept)
    fewer = secure_total(second_run, ["s0", "s1", "s2"], "v")
    assert fewer.refused is not None and fewer.parts == {}
    assert all("summed before with 4 sites" in fewer.excluded[s] for s in ("s0", "s1", "s2"))
    third_run, _ = _federation(parts, **kept)
    again = secure_total(third_run, sorted(parts), "v")
    assert again.refused is None
    np.testing.assert_array_equal(again.parts["overall"], everyone.parts["overall"])
    recorded = SiteState(tmp_path / "s0", "s0").sums()
    # digests (the vector's, and each non-zero part's) and the sites: no counts
    assert len(recorded) == 1 + len(parts["s0"])
    assert all(v == sorted(parts) for v in recorded.values())
    assert SiteState(tmp_path / "s0", "s0").summary()["secure_sums"] == 1  # one vector


def test_a_state_dir_another_run_holds_is_waited_for_then_refused_in_one_line(
        tmp_path: Path) -> None:
    from filelock import FileLock

    state = SiteState(tmp_path / "s0", "s0", timeout=0.2)
    with state.locked():  # re-entrant within one object
        with state.locked():
            state.record_sums({"d": ["s0", "s1", "s2"]})
    other = FileLock(tmp_path / "s0" / "state.lock")
    with other, pytest.raises(SiteStateError, match=r"stayed locked by another run for 0\.2 s"):
        with state.locked():
            pass
    (tmp_path / "s0" / "secure_sums.json").write_text("[1, 2]")
    with pytest.raises(SiteStateError, match="not a secure-sum record"):
        state.sums()


def _coarsened(part: np.ndarray, n_bins: int) -> np.ndarray:
    """A fine histogram part (negatives, then positives) merged onto ``n_bins`` bins."""
    halves = part.reshape(2, n_bins, -1)
    return halves.sum(axis=2).ravel()


@pytest.mark.parametrize("fresh", [False, True])
def test_the_same_model_on_another_grid_is_refused_over_other_sites(tmp_path: Path,
                                                                    fresh: bool) -> None:
    """A rebinning attack: run 1 sums the test histograms of a model on 100 bins over four
    sites, run 2 (a rerun of the same model with ``evaluation.histogram_bins: 50``) over three.
    Merging run 1's total onto 50 bins and taking run 2's away gives the fourth site's
    histogram exactly: the contents differ (another grid), so no digest matches. A site with a
    ``state_dir`` keeps the grids it has summed histograms on, with the sites, and refuses a
    histogram on another grid over another set of sites; over the same set it is answered."""
    from multimodal_fl.evaluation.histograms import histogram_parts

    rng = np.random.default_rng(11)
    scored = {f"s{i}": (rng.integers(0, 2, 40), rng.random(40)) for i in range(4)}

    def run(n_bins: int, sites: list[str], state: bool) -> SecureTotal:
        parts = {n: histogram_parts(y, s, n_bins=n_bins, min_cell=1)
                 for n, (y, s) in scored.items()}
        kw = {n: {"grid": n_bins, "fresh": fresh,
                  **({"state": tmp_path / n} if state else {})} for n in parts}
        federation, _ = _federation(parts, **kw)
        return secure_total(federation, sites, "v")

    everyone = run(100, sorted(scored), state=False)
    fewer = run(50, ["s0", "s1", "s2"], state=False)
    assert fewer.refused is None  # the leak, without a state directory
    s3 = histogram_parts(*scored["s3"], n_bins=50, min_cell=1)["overall"]
    np.testing.assert_array_equal(
        _coarsened(everyone.parts["overall"], 50) - fewer.parts["overall"], s3)

    assert run(100, sorted(scored), state=True).refused is None
    assert run(50, sorted(scored), state=True).refused is None  # the same four: no difference
    for n_bins in (50, 30, 100):
        fewer = run(n_bins, ["s0", "s1", "s2"], state=True)
        assert fewer.refused is not None and fewer.parts == {}
        assert all("on another grid" in fewer.excluded[s] or "summed before" in fewer.excluded[s]
                   for s in ("s0", "s1", "s2")), fewer.excluded
    fewer = run(25, ["s0", "s1", "s2"], state=True)  # a grid not summed before
    assert "histograms on 100 bins were summed before with 4 sites" in fewer.excluded["s0"]
    # grids are recorded with their sites, not counted as sums
    assert SiteState(tmp_path / "s0", "s0").summary()["secure_sums"] == 2


def test_the_same_part_inside_another_vector_is_refused_over_other_sites() -> None:
    """A run that asks for other parts (a config without subgroups) holds the same
    ``overall`` histogram in a vector of different content: its total over three of the four
    sites minus the first total's ``overall`` would be the fourth site's histogram exactly.
    Each site keeps a digest of every non-zero part too and refuses; the whole-vector rule
    alone let it through."""
    parts = _parts(4)
    federation, sites = _federation(parts)
    everyone = secure_total(federation, sorted(parts), "v")
    assert everyone.refused is None
    for name, site in sites.items():
        site.party.hold("v", {"overall": parts[name]["overall"]}, min_cell=5)
    fewer = secure_total(federation, ["s0", "s1", "s2"], "v")
    assert fewer.refused is not None and fewer.parts == {}
    assert all("a part of this 'v' was summed before with 4 sites" in fewer.excluded[s]
               for s in ("s0", "s1", "s2"))
    # over the same four sites it is answered: the same total, nothing new
    again = secure_total(federation, sorted(parts), "v")
    assert again.refused is None
    np.testing.assert_array_equal(again.parts["overall"], everyone.parts["overall"])
    # a model update (held once) is checked as a whole: its constant group counts are summed
    # over changing sets of sites round after round by design
    for site in sites.values():
        site.party.hold("u", {"w/x": np.array([7, 7]), "d/x": RNG.integers(0, 9, 3)},
                        min_cell=5, once=True)
    assert secure_total(federation, sorted(parts), "u").refused is None
    for site in sites.values():
        site.party.hold("u", {"w/x": np.array([7, 7]), "d/x": RNG.integers(10, 19, 3)},
                        min_cell=5, once=True)
    assert secure_total(federation, ["s0", "s1", "s2"], "u").refused is None
