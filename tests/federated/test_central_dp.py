"""Site-level DP of the aggregate: clipping each site's update, noise on the sum, the loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from toy import initial_weights, toy_config, toy_federation

from multimodal_fl.federated.aggregation import ServerOptimizer
from multimodal_fl.federated.central_dp import (
    SiteLevelDP,
    clip_update,
    private_mean,
    site_update,
)
from multimodal_fl.federated.protocol import Reply
from multimodal_fl.federated.server import RunConfig, run_federated


def _reply(site: str, w: float, *, counts: dict[str, int] | None = None, n: int = 20,
           local: list[str] | None = None) -> Reply:
    return Reply(site=site, kind="fit", round=1, n_samples=n,
                 weights={"enc.w": np.full(4, w, np.float32), "head.b": np.full(1, w, np.float32),
                          "std.mean": np.zeros(3), "steps": np.array(5, np.int64)},
                 group_counts=counts or {"enc.": n}, local_keys=local or [])


GLOBAL = {"enc.w": np.zeros(4, np.float32), "head.b": np.zeros(1, np.float32),
          "std.mean": np.zeros(3), "steps": np.array(3, np.int64)}


def test_clip_update_scales_to_the_norm_over_all_arrays() -> None:
    update = {"a": np.array([3.0, 0.0]), "b": np.array([4.0])}
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(5.0)
    assert math.sqrt(sum(float(np.sum(v ** 2)) for v in clipped.values())) == pytest.approx(1.0)
    same, small = clip_update({"a": np.array([0.3])}, 1.0)
    assert small == pytest.approx(0.3) and same["a"][0] == pytest.approx(0.3)


def test_site_update_leaves_out_integer_and_local_keys_and_untrained_groups() -> None:
    reply = _reply("a", 1.0, local=["head.b"])
    upd = site_update(reply, GLOBAL)
    assert set(upd) == {"enc.w", "std.mean"}  # no integer buffer, no FedBN local key
    assert np.all(upd["enc.w"] == 1.0)
    untrained = site_update(_reply("b", 1.0, counts={"enc.": 0}), GLOBAL)
    assert np.all(untrained["enc.w"] == 0) and np.all(untrained["head.b"] == 1.0)


def test_private_mean_is_the_noised_mean_of_clipped_updates_with_equal_weights() -> None:
    # a: update norm sqrt(5 * 9) > S, clipped to S; b: norm sqrt(5 * 0.01) < S, kept
    replies = [_reply("b", 0.1, n=1000), _reply("a", 3.0, n=10)]
    dp = SiteLevelDP(clip_norm=1.0, noise_multiplier=0.5)
    out, info = private_mean(replies, GLOBAL, dp, rng=np.random.default_rng(0))
    noise = np.random.default_rng(0)
    expect_a = 3.0 / math.sqrt(5 * 9.0)  # every coordinate of a's clipped update
    # noise is drawn in sorted key order over the keys some site changed
    n_enc, n_head = noise.normal(0, 0.5, 4), noise.normal(0, 0.5, 1)
    np.testing.assert_allclose(out["enc.w"], (expect_a + 0.1 + n_enc) / 2, rtol=1e-6)
    np.testing.assert_allclose(out["head.b"], (expect_a + 0.1 + n_head) / 2, rtol=1e-6)
    assert out["enc.w"].dtype == np.float32
    assert "std.mean" not in out and "steps" not in out  # unchanged by every site: kept
    assert info == {"clipped": ["a"], "noise_std": 0.25, "sites": 2}


def test_the_noise_has_the_stated_standard_deviation() -> None:
    replies = [_reply(s, 0.0) for s in "abcd"]
    replies[0].weights["enc.w"] = np.full(4, 1e-3, np.float32)  # one key changed
    big = {"enc.w": np.zeros(20000, np.float32), **{k: v for k, v in GLOBAL.items()
                                                    if k != "enc.w"}}
    for r in replies:
        r.weights["enc.w"] = np.full(20000, r.weights["enc.w"][0], np.float32)
    out, info = private_mean(replies, big, SiteLevelDP(2.0, 1.5), rng=np.random.default_rng(1))
    assert info["noise_std"] == pytest.approx(1.5 * 2.0 / 4)
    assert float(np.std(out["enc.w"])) == pytest.approx(info["noise_std"], rel=0.03)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        SiteLevelDP(0.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        SiteLevelDP(1.0, float("nan"))
    with pytest.raises(ValueError, match="no replies"):
        private_mean([], GLOBAL, SiteLevelDP(1.0, 1.0))


def test_the_server_loop_applies_site_level_dp_each_round() -> None:
    config = toy_config(2, optimizer=ServerOptimizer("fedavg"))
    plain = run_federated(toy_federation(), initial_weights(0), config)
    dp = RunConfig(**{**config.__dict__, "site_dp": SiteLevelDP(0.05, 1.0)})
    private = run_federated(toy_federation(), initial_weights(0), dp)
    assert [r.site_dp["sites"] for r in private.history] == [3, 3]
    assert all(r.site_dp["clipped"] for r in private.history)  # S = 0.05 clips the toy's updates
    assert all(not r.site_dp for r in plain.history)
    assert not np.allclose(private.weights["head.weight"], plain.weights["head.weight"])
    assert dp.to_json()["site_dp"] == {"clip_norm": 0.05, "noise_multiplier": 1.0}
