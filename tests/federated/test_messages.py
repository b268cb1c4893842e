"""Messages: Flower-shaped flattening round-trips, typed errors, the site seed."""

from __future__ import annotations

import numpy as np
import pytest

from multimodal_fl.federated.messages import InvalidReply, Reply, Request, SiteFailure, site_seed


def _reply() -> Reply:
    return Reply(
        site="a",
        kind="fit",
        round=3,
        weights={"enc.w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(4)},
        group_counts={"enc.": 5, "text.": 0},
        n_samples=7,
        metrics={"loss": 0.25},
        arrays={"summary": np.ones(2)},
        local_keys=["bn.running_mean"],
    )


def test_reply_records_round_trip() -> None:
    reply = _reply()
    arrays, metrics, config = reply.to_records()
    assert set(metrics) == {"n_samples", "metric/loss", "group/enc.", "group/text."}
    assert all(isinstance(v, int | float) for v in metrics.values())
    back = Reply.from_records(arrays, metrics, config)
    assert back.site == "a" and back.kind == "fit" and back.round == 3
    assert back.n_samples == 7 and back.group_counts == {"enc.": 5, "text.": 0}
    assert back.metrics == {"loss": 0.25} and back.local_keys == ["bn.running_mean"]
    assert set(back.weights) == {"enc.w", "n"} and set(back.arrays) == {"summary"}
    np.testing.assert_array_equal(back.weights["enc.w"], reply.weights["enc.w"])


def test_request_records_round_trip() -> None:
    request = Request("fit", 2, {"w": np.zeros(3)}, {"seed": 1, "lr": 0.1, "fedbn": True})
    arrays, config = request.to_records()
    back = Request.from_records(arrays, config)
    assert back.kind == "fit" and back.round == 2
    assert back.config == {"seed": 1, "lr": 0.1, "fedbn": True}
    np.testing.assert_array_equal(back.weights["w"], np.zeros(3))


def test_from_records_names_missing_fields() -> None:
    arrays, metrics, config = _reply().to_records()
    del config["site"]
    with pytest.raises(ValueError, match="'site'"):
        Reply.from_records(arrays, metrics, config)
    with pytest.raises(ValueError, match="'round'"):
        Request.from_records({}, {"kind": "fit"})


def test_invalid_reply_names_site_and_reason() -> None:
    err = InvalidReply("site_b", "missing keys: 'w'")
    assert err.site == "site_b" and err.reason == "missing keys: 'w'"
    assert "site_b" in str(err) and "missing keys" in str(err)
    assert SiteFailure("x", "timed out").reason == "timed out"


def test_site_seed_is_stable_and_distinct() -> None:
    assert site_seed(0, "a", 1) == site_seed(0, "a", 1)
    seeds = {site_seed(s, n, r) for s in (0, 1) for n in ("a", "b") for r in (1, 2)}
    assert len(seeds) == 8
    assert all(0 <= s < 2**63 for s in seeds)
