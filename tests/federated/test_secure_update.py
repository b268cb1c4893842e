"""Secure aggregation of model updates on toy sites: the encoding, the checks, the server loop.

The oracle is plain FedAvg of the same updates (:func:`~multimodal_fl.federated.aggregation.
aggregate`): a secured round gives it within the quantisation bound, ``1 / (2 * 2**24)`` per
value of the mean delta, plus one float32 rounding of the weight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pytest

from multimodal_fl.federated.aggregation import (
    ServerOptimizer,
    aggregate,
    check_fit_reply,
    server_step,
)
from multimodal_fl.federated.inprocess import InProcessFederation
from multimodal_fl.federated.protocol import InvalidReply, Kind, Reply, Request, SiteFailure
from multimodal_fl.federated.secure_update import (
    DELTA_PREFIX,
    UPDATE_VECTOR,
    WEIGHT_PREFIX,
    SecureAggregation,
    UpdateRejected,
    decode_update,
    encode_update,
)
from multimodal_fl.federated.server import RoundFailed, RunConfig, StateDict, run_federated
from tests.federated.toy import ToySite, initial_weights

SECURE = SecureAggregation()
NAMES = ("a", "b", "c", "d")


def _sites(names: tuple[str, ...] = NAMES, **kw: object) -> dict[str, ToySite]:
    # site b freezes its encoder: its group counts 0, as a site without a modality
    return {n: ToySite(n, n=32 + 16 * i, shift=0.3 * i, train_encoder=(n != "b"), **kw)
            for i, n in enumerate(names)}  # type: ignore[arg-type]


def _config(rounds: int = 1, **kw: object) -> RunConfig:
    base: dict[str, object] = {"rounds": rounds, "min_sites": 3, "seed": 7, "evaluate_every": 0,
                               "fit_config": {"local_steps": 4, "lr": 0.1}, "secure": SECURE}
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


def _bound(plain: np.ndarray, settings: SecureAggregation = SECURE) -> np.ndarray:
    """The stated bound per value: the quantisation error plus one float32 rounding."""
    return settings.error_bound + np.spacing(np.abs(plain).astype(plain.dtype))


def _plain_fedavg(sites: Mapping[str, ToySite], weights: StateDict, rnd: int,
                  config: RunConfig) -> tuple[StateDict, list[Reply]]:
    """Plain FedAvg of the same sites' updates from ``weights`` in round ``rnd``."""
    fit = {**dict(config.fit_config), "seed": config.seed, "proximal_mu": 0.0, "fedbn": False}
    replies = [sites[s].handle(Request(Kind.FIT, rnd, dict(weights), dict(fit)))
               for s in sorted(sites)]
    return aggregate(replies, weights), replies


def _assert_within_bound(secure: StateDict, plain: StateDict, start: StateDict) -> None:
    for key, value in start.items():
        if not np.issubdtype(value.dtype, np.floating):  # integer buffers keep their value
            np.testing.assert_array_equal(secure[key], value)
            continue
        gap = np.abs(secure[key].astype(np.float64) - plain[key].astype(np.float64))
        assert (gap <= _bound(plain[key])).all(), (key, float(gap.max()))


# --------------------------------------------------------------------------- the encoding


def test_the_decoded_sum_is_fedavg_per_group_within_the_bound() -> None:
    """Four sites, one without the encoder group (count 0): the decoded sum is FedAvg."""
    start = initial_weights(0)
    fit = {"seed": 7, "local_steps": 4, "lr": 0.1}
    replies = [site.handle(Request(Kind.FIT, 1, dict(start), dict(fit)))
               for site in _sites().values()]
    assert replies[1].group_counts == {"encoder.": 0}
    parts = [encode_update(r.weights, start, n_samples=r.n_samples, group_counts=r.group_counts,
                           loss=r.metrics["loss"], settings=SECURE, site=r.site) for r in replies]
    assert all(p.keys() == parts[0].keys() for p in parts)  # every site lays out every part
    total = {name: sum(p[name] for p in parts) for name in parts[0]}
    decoded = decode_update(total, start, SECURE, max_count=sum(r.n_samples for r in replies))
    plain = aggregate(replies, start)
    merged = {**start, **decoded.averaged}
    _assert_within_bound(merged, {**start, **plain}, start)
    assert "encoder.1.num_batches_tracked" not in decoded.averaged
    assert decoded.counts["encoder.0.weight"] == sum(r.n_samples for r in replies) - 48
    loss = sum(r.n_samples * r.metrics["loss"] for r in replies) / decoded.n_samples
    assert abs(decoded.train_loss - loss) <= SECURE.error_bound


@pytest.mark.parametrize("fault", ["clip", "nan", "shape", "loss"])
def test_a_site_refuses_an_update_it_cannot_encode_exactly(fault: str) -> None:
    start = initial_weights(0)
    new = {k: v.copy() for k, v in start.items()}
    loss = 0.5
    if fault == "clip":
        new["head.weight"][0, :3] += 100.0  # three values beyond clip=64
    elif fault == "nan":
        new["head.bias"][0] = np.nan
    elif fault == "shape":
        new["head.bias"] = np.zeros(2, np.float32)
    else:
        loss = 1e6
    with pytest.raises(UpdateRejected) as info:
        encode_update(new, start, n_samples=10, group_counts={}, loss=loss, settings=SECURE,
                      site="a")
    want = {"clip": "3 update value(s) outside ±64 (federated.secure_clip) in 'head.weight'",
            "nan": "'head.bias' has non-finite values", "shape": "has shape (2,)",
            "loss": "in 'loss'"}[fault]
    assert want in str(info.value) and "\n" not in str(info.value)


def test_the_server_rejects_a_sum_out_of_range() -> None:
    """A site that masked values outside ``±clip`` shows in the unmasked sum."""
    start = initial_weights(0)
    parts = encode_update(start, start, n_samples=10, group_counts={}, loss=0.5,
                          settings=SECURE, site="a")
    total = {k: 3 * v for k, v in parts.items()}
    decode_update(total, start, SECURE, max_count=30)
    bad = dict(total)
    bad[DELTA_PREFIX + "head.bias"] = bad[DELTA_PREFIX + "head.bias"] + 7 * SECURE.offset * 30
    with pytest.raises(UpdateRejected,
                       match=re.escape("mean delta of 'head.bias' lies outside ±64")):
        decode_update(bad, start, SECURE, max_count=30)
    many = dict(total, **{WEIGHT_PREFIX + "head.bias": np.array([31])})
    with pytest.raises(UpdateRejected,
                       match=re.escape("count of 'head.bias' is 31, expected 0 to 30")):
        decode_update(many, start, SECURE, max_count=30)
    short = {k: v for k, v in total.items() if k != DELTA_PREFIX + "head.bias"}
    with pytest.raises(UpdateRejected, match=re.escape("lacks part 'd/head.bias'")):
        decode_update(short, start, SECURE, max_count=30)


def test_the_server_rejects_a_secured_fit_reply_that_carries_the_update() -> None:
    start = initial_weights(0)
    fit = {"seed": 7, "local_steps": 2, "lr": 0.1}
    plain = _sites()["b"].handle(Request(Kind.FIT, 1, dict(start), dict(fit)))
    with pytest.raises(InvalidReply, match=re.escape(
            "a secured fit reply carries ['weights', 'group_counts']")):
        check_fit_reply(plain, site="b", round=1, reference=start, masked=True)
    secured = _sites()["b"].handle(Request(Kind.FIT, 1, dict(start),
                                           {**fit, **SECURE.to_config()}))
    assert not secured.weights and not secured.group_counts and not secured.metrics
    check_fit_reply(secured, site="b", round=1, reference=start, masked=True)


# --------------------------------------------------------------------------- the server loop


def test_secured_rounds_equal_plain_fedavg_within_the_bound() -> None:
    """Each of three secured rounds gives plain FedAvg of the same updates within the bound,
    and the server never receives a weight."""
    sites = _sites()
    seen: list[StateDict] = []
    config = _config(rounds=3)
    result = run_federated(InProcessFederation(sites), initial_weights(0), config,
                           on_round=lambda record, w: seen.append(w))
    assert [r.replied for r in result.history] == [list(NAMES)] * 3
    starts = [initial_weights(0), *seen[:-1]]
    for rnd, (start, secure) in enumerate(zip(starts, seen, strict=True), start=1):
        plain, replies = _plain_fedavg(_sites(), start, rnd, config)
        _assert_within_bound(secure, {**start, **plain}, start)
        record = result.history[rnd - 1]
        loss = sum(r.n_samples * r.metrics["loss"] for r in replies) / sum(
            r.n_samples for r in replies)
        assert record.train_loss is not None and abs(record.train_loss - loss) < 1e-6
        assert record.fit_metrics == {} and record.secure["sites"] == list(NAMES)
        assert record.secure["error_bound"] == SECURE.error_bound


def test_fedadam_steps_on_the_securely_aggregated_mean_delta() -> None:
    opt = ServerOptimizer("fedadam", eta=0.05)
    start = initial_weights(0)
    secure = run_federated(InProcessFederation(_sites()), start, _config(optimizer=opt)).weights
    plain, _ = _plain_fedavg(_sites(), start, 1, _config())
    expected, _ = server_step(start, plain, {}, opt)
    # FedAdam's first step moves at most eta * (1 - beta1) / tau per unit of delta
    gain = opt.eta * (1 - opt.beta1) / opt.tau
    for key, value in expected.items():
        if np.issubdtype(value.dtype, np.floating):
            avg = {**start, **plain}[key]
            gap = np.abs(secure[key].astype(np.float64) - value.astype(np.float64))
            allowed = gain * (_bound(avg) + np.spacing(np.abs(avg))) + np.spacing(np.abs(value))
            assert (gap <= allowed).all(), key
    moved = [k for k in expected if not np.array_equal(expected[k], start[k])]
    assert moved  # the step did something


class DropAt:
    """A federation whose site ``gone`` fails every request from one secure-sum step on."""

    def __init__(self, inner: InProcessFederation, gone: str, step: str) -> None:
        self.inner, self.gone, self.step = inner, gone, step
        self.dropped = False

    def sites(self) -> list[str]:
        return self.inner.sites()

    def broadcast(self, requests: Mapping[str, Request], timeout: float | None = None
                  ) -> dict[str, Reply | SiteFailure]:
        answers = self.inner.broadcast(requests, timeout)
        request = requests.get(self.gone)
        if request is not None and request.kind == Kind.SECURE_SUM:
            self.dropped |= request.config["step"] == self.step
            if self.dropped:
                answers[self.gone] = SiteFailure(self.gone, "ConnectionError: link down")
        return answers


def test_one_site_dropping_after_key_sharing_still_completes_the_round() -> None:
    federation = DropAt(InProcessFederation(_sites()), "d", "masked")
    start = initial_weights(0)
    result = run_federated(federation, start, _config())
    record = result.history[0]
    assert federation.dropped and record.attempts == 1
    assert record.replied == ["a", "b", "c"] and record.secure["sites"] == ["a", "b", "c"]
    assert "masked: ConnectionError: link down" in record.failed["d"]
    assert record.secure["excluded"] == {"d": "masked: ConnectionError: link down"}
    three = {n: s for n, s in _sites().items() if n != "d"}
    plain, _ = _plain_fedavg(three, start, 1, _config())
    _assert_within_bound(result.weights, {**start, **plain}, start)


class DropOnce(DropAt):
    """Site ``gone`` fails one secure-sum step once (its first ``step``), then recovers."""

    def broadcast(self, requests: Mapping[str, Request], timeout: float | None = None
                  ) -> dict[str, Reply | SiteFailure]:
        answers = self.inner.broadcast(requests, timeout)
        request = requests.get(self.gone)
        if (request is not None and request.kind == Kind.SECURE_SUM and not self.dropped
                and request.config["step"] == self.step):
            self.dropped = True
            answers[self.gone] = SiteFailure(self.gone, "ConnectionError: link down")
        return answers


def test_a_secured_round_short_of_min_sites_is_retried_without_a_total_to_difference() -> None:
    """With ``min_sites`` 4, site d drops at the masked step of attempt 1: the sum stops before
    unmasking (the server never learns the three-site total it would reject), so attempt 2's
    sum of the same retrained updates over all four is the first and completes. Before, the
    three sites unmasked attempt 1's total and then refused attempt 2 (a second sum of one
    content over another set): the round failed."""
    sites = _sites()
    federation = DropOnce(InProcessFederation(sites), "d", "masked")
    start = initial_weights(0)
    result = run_federated(federation, start, _config(min_sites=4, max_attempts=2))
    record = result.history[0]
    assert federation.dropped and record.attempts == 2
    assert "3 sent a masked vector" in record.earlier_attempts[0]
    assert record.replied == list(NAMES) and record.secure["sites"] == list(NAMES)
    # each site helped unmask one total of the round's update, over the four sites
    assert all(list(s.party.summed.values()) == [list(NAMES)] for s in sites.values())
    plain, _ = _plain_fedavg(_sites(), start, 1, _config())
    _assert_within_bound(result.weights, {**start, **plain}, start)


def test_fewer_than_three_sites_are_refused_with_the_reason_not_run_in_the_clear() -> None:
    two = {n: s for n, s in _sites().items() if n in ("a", "c")}
    with pytest.raises(RoundFailed) as info:
        run_federated(InProcessFederation(two), initial_weights(0), _config(min_sites=1))
    message = str(info.value)
    assert "secure aggregation needs at least 3 sites" in message and "min_sites=3" in message
    assert two["a"].calls == two["c"].calls == [("info", 0)]  # no site trained for nothing
    # and a drop that leaves two in the sum fails the round rather than summing two
    three = {n: s for n, s in _sites().items() if n in ("a", "b", "c")}
    with pytest.raises(RoundFailed, match="2 sent a masked vector"):
        run_federated(DropAt(InProcessFederation(three), "c", "masked"), initial_weights(0),
                      _config())


def test_a_clipping_site_is_left_out_loudly_and_the_round_goes_on() -> None:
    sites = _sites()
    tight = SecureAggregation(clip=1e-6)  # every real update exceeds it
    with pytest.raises(RoundFailed) as info:
        run_federated(InProcessFederation(sites), initial_weights(0), _config(secure=tight))
    assert "outside ±1e-06 (federated.secure_clip)" in str(info.value)
    assert UPDATE_VECTOR not in sites["a"].party.held  # nothing was kept for a sum
