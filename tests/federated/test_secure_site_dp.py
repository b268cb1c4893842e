"""Site-level DP together with secure aggregation: each site clips, the server noises the sum.

Flower's client-side fixed clipping (``DifferentialPrivacyClientSideFixedClipping`` with
``fixedclipping_mod``) over the package's secure sum. The oracles: the plain site-level path
(:func:`~multimodal_fl.federated.central_dp.private_mean`, where the server clips) gives the same
model when the noise multiplier is 0, within the quantisation bound; the noise on the secured
path has standard deviation ``z * S`` on the sum; and what the server unmasks is never longer
than ``S`` per site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest

from multimodal_fl.federated.central_dp import SiteLevelDP, noisy_mean, private_mean
from multimodal_fl.federated.inprocess import InProcessFederation
from multimodal_fl.federated.protocol import Kind, Reply, Request
from multimodal_fl.federated.secure_update import (
    CLIPPED_PART,
    SecureAggregation,
    UpdateRejected,
    decode_clipped_sum,
    encode_update,
    summed_keys,
)
from multimodal_fl.federated.server import RunConfig, StateDict, run_federated
from tests.federated.toy import ToySite, initial_weights

NAMES = ("a", "b", "c", "d")
FIT = {"seed": 7, "local_steps": 4, "lr": 0.1}


def _sites() -> dict[str, ToySite]:
    # site b freezes its encoder (its group counts 0), as a site without a modality
    return {n: ToySite(n, n=32 + 16 * i, shift=0.3 * i, train_encoder=(n != "b"))
            for i, n in enumerate(NAMES)}


def _config(dp: SiteLevelDP, *, secure: bool, **kw: object) -> RunConfig:
    base: dict[str, object] = {"rounds": 1, "min_sites": 3, "seed": 7, "evaluate_every": 0,
                               "fit_config": dict(FIT), "site_dp": dp,
                               "secure": SecureAggregation() if secure else None}
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


def _norm(update: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v))) for v in update.values()))


def _plain_norms(start: StateDict) -> dict[str, float]:
    """Each toy site's unweighted update norm in round 1 (plain replies)."""
    out = {}
    for name, site in _sites().items():
        reply = site.handle(Request(Kind.FIT, 1, dict(start), dict(FIT)))
        keys = summed_keys(start)
        out[name] = _norm({k: reply.weights[k].astype(np.float64) - start[k] for k in keys
                           if k in reply.weights and (name != "b" or not k.startswith("encoder"))})
    return out


def _parts(new: StateDict, start: StateDict, settings: SecureAggregation,
           site: str = "a") -> dict[str, np.ndarray]:
    return encode_update(new, start, n_samples=40, group_counts={}, loss=0.5,
                         settings=settings, site=site)


# --------------------------------------------------------------------------- at the site


def test_a_site_whose_update_exceeds_s_clips_it_before_masking() -> None:
    """What the server could unmask from one site is at most ``S`` long; the site says it
    clipped with a 1 (no norm), a site within ``S`` sends its update unchanged and a 0."""
    start = initial_weights(0)
    big = {k: v + (3.0 if np.issubdtype(v.dtype, np.floating) else 0) for k, v in start.items()}
    settings = SecureAggregation(clip_norm=0.5)
    parts = _parts(big, start, settings)
    assert parts[CLIPPED_PART].tolist() == [1]
    one = decode_clipped_sum(parts, start, settings, max_count=40, n_sites=1)
    assert one.clipped == 1
    assert one.sum_norm <= 0.5 + math.sqrt(sum(v.size for v in start.values())) * \
        settings.error_bound
    unclipped = _norm({k: big[k].astype(np.float64) - start[k] for k in summed_keys(start)})
    assert unclipped > 10 * 0.5  # far beyond S: the server never sees it
    small = {k: v + (1e-3 if np.issubdtype(v.dtype, np.floating) else 0)
             for k, v in start.items()}
    kept = decode_clipped_sum(_parts(small, start, settings), start, settings, max_count=40,
                              n_sites=1)
    assert kept.clipped == 0
    for key, value in kept.sums.items():
        want = (small[key].astype(np.float64) - start[key]).reshape(value.shape)
        assert np.abs(value - want).max() <= settings.error_bound, key


def test_a_site_that_did_not_clip_shows_in_the_sum() -> None:
    """A site that masked an update longer than ``S`` (it skipped the clipping) fails the
    server's check on the unmasked sum: ``n_sites * S`` at most."""
    start = initial_weights(0)
    big = {k: v + (3.0 if np.issubdtype(v.dtype, np.floating) else 0) for k, v in start.items()}
    honest = SecureAggregation(clip_norm=100.0)  # a site that clipped at 100, not at 0.5
    parts = _parts(big, start, honest)
    with pytest.raises(UpdateRejected, match=r"exceeds 1 sites x clip_norm 0\.5: a site did "
                                             "not clip"):
        decode_clipped_sum(parts, start, SecureAggregation(clip_norm=0.5), max_count=40,
                           n_sites=1)


def test_the_noise_on_the_secured_sum_has_standard_deviation_z_s() -> None:
    """Three sites' clipped updates summed through the encoding, noise from the OS's CSPRNG:
    over 60,000 coordinates the noise on the sum has standard deviation ``z * S`` (within 2%;
    the sample standard deviation's own relative error is about 0.3% here)."""
    rng = np.random.default_rng(3)
    start = {"w": np.zeros(60_000, np.float32), "b": np.zeros(3, np.float32)}
    dp = SiteLevelDP(clip_norm=2.0, noise_multiplier=1.5)
    settings = SecureAggregation(clip_norm=dp.clip_norm)
    parts = [_parts({k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
                     for k, v in start.items()}, start, settings, site=s) for s in "abc"]
    total = {name: sum(p[name] for p in parts) for name in parts[0]}
    summed = decode_clipped_sum(total, start, settings, max_count=120, n_sites=3)
    assert summed.clipped == 3  # each update's norm is about 0.05 * sqrt(60,000) = 12 > S
    noised, info = noisy_mean(summed.sums, start, dp, 3)
    noise = (noised["w"].astype(np.float64) * 3) - summed.sums["w"]
    assert info["noise_std"] == pytest.approx(1.5 * 2.0 / 3)
    assert float(np.std(noise)) == pytest.approx(1.5 * 2.0, rel=0.02)
    assert abs(float(np.mean(noise))) < 4 * 3.0 / math.sqrt(noise.size)


# --------------------------------------------------------------------------- the server loop


def test_secured_and_plain_site_level_dp_agree_without_noise() -> None:
    """z = 0: the secured path (sites clip, the server sums) gives the plain site-level path's
    model (the server clips) within the quantisation bound plus one float32 rounding; ``S``
    sits between the sites' update norms, so some sites clip and some do not."""
    start = initial_weights(0)
    norms = _plain_norms(start)
    s = float(np.median(list(norms.values())))
    assert min(norms.values()) < s < max(norms.values())
    dp = SiteLevelDP(clip_norm=s, noise_multiplier=0.0)
    secured = run_federated(InProcessFederation(_sites()), start, _config(dp, secure=True))
    plain = run_federated(InProcessFederation(_sites()), start, _config(dp, secure=False))
    bound = SecureAggregation().error_bound
    for key, value in start.items():
        if not np.issubdtype(value.dtype, np.floating):  # not summed: keeps its global value
            np.testing.assert_array_equal(secured.weights[key], value)
            continue
        a = secured.weights[key].astype(np.float64)
        b = plain.weights[key].astype(np.float64)
        assert (np.abs(a - b) <= bound + np.spacing(np.abs(b).astype(value.dtype))).all(), key
    moved = sum(float(np.abs(secured.weights[k] - start[k]).sum()) for k in summed_keys(start))
    assert moved > 1e-3
    record, plain_record = secured.history[0], plain.history[0]
    assert record.site_dp["clipped_count"] == len(plain_record.site_dp["clipped"])
    assert 0 < record.site_dp["clipped_count"] < len(NAMES)
    assert record.site_dp["clipped_at"] == "site" and record.site_dp["sites"] == len(NAMES)
    assert record.secure["clip_norm"] == s and "delta_norm" not in record.secure


def test_every_site_clips_and_the_unmasked_sum_is_within_s_per_site(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``S`` below every site's update norm, every site clips at home: the unmasked sum
    the server reads is at most ``S`` per site, and the fit requests carried ``S``."""
    import multimodal_fl.federated.server as server

    seen: list[tuple[float, int]] = []
    decode = server.decode_clipped_sum

    def spy(*args: object, **kwargs: object) -> object:
        out = decode(*args, **kwargs)  # type: ignore[arg-type]
        seen.append((out.sum_norm, int(kwargs["n_sites"])))  # type: ignore[call-overload]
        return out

    monkeypatch.setattr(server, "decode_clipped_sum", spy)
    start = initial_weights(0)
    s = min(_plain_norms(start).values()) / 4
    sites = _sites()
    result = run_federated(InProcessFederation(sites), start,
                           _config(SiteLevelDP(s, 0.0), secure=True, rounds=2))
    assert [r.site_dp["clipped_count"] for r in result.history] == [len(NAMES)] * 2
    size = sum(v.size for v in start.values())
    assert len(seen) == 2
    for norm, n_sites in seen:
        assert n_sites == len(NAMES)
        assert norm <= n_sites * (s + math.sqrt(size) * SecureAggregation().error_bound)


def test_the_loop_asks_for_site_clipping_and_refuses_a_stray_clip_norm() -> None:
    dp = SiteLevelDP(0.5, 1.0)
    config = _config(dp, secure=True)  # built: the combination is no longer refused
    asked: list[Request] = []

    class Spy(InProcessFederation):
        def broadcast(self, requests: Mapping[str, Request], timeout: float | None = None
                      ) -> dict[str, Reply | object]:  # type: ignore[override]
            asked.extend(r for r in requests.values() if r.kind == Kind.FIT)
            return super().broadcast(requests, timeout)  # type: ignore[return-value]

    run_federated(Spy(_sites()), initial_weights(0), config)
    assert asked and all(r.config["secure_clip_norm"] == 0.5 for r in asked)
    assert SecureAggregation.from_request(asked[0]) == SecureAggregation(clip_norm=0.5)
    with pytest.raises(ValueError, match=r"secure\.clip_norm=0\.5 without site_dp"):
        RunConfig(rounds=1, secure=SecureAggregation(clip_norm=0.5))
    with pytest.raises(ValueError, match=r"clip_norm=0\.0: expected a finite number > 0"):
        SecureAggregation(clip_norm=0.0)
    # a secured run's checkpointed config reads as before clip_norm existed (resume compares it)
    assert "clip_norm" not in RunConfig(rounds=1, secure=SecureAggregation()).to_json()["secure"]


def test_plain_site_level_dp_is_unchanged_by_the_refactoring() -> None:
    """The plain path still clips at the server and reports the clipped sites by name."""
    start = initial_weights(0)
    dp = SiteLevelDP(1e-3, 0.0)
    result = run_federated(InProcessFederation(_sites()), start, _config(dp, secure=False))
    record = result.history[0]
    assert record.site_dp["clipped"] == list(NAMES) and record.secure == {}
    fit = {**FIT, "proximal_mu": 0.0, "fedbn": False}
    replies = [site.handle(Request(Kind.FIT, 1, dict(start), dict(fit)))
               for site in _sites().values()]
    want, _ = private_mean(replies, start, dp, rng=np.random.default_rng(0))
    for key, value in want.items():
        np.testing.assert_array_equal(result.weights[key], value)
