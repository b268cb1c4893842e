"""Messages: Flower-shaped flattening round-trips, typed errors, the site seed."""

from __future__ import annotations

import numpy as np
import pytest

from multimodal_fl.federated.protocol import InvalidReply, Reply, Request, SiteFailure, site_seed


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


def test_request_kinds_are_one_enum_and_unknown_kinds_are_refused() -> None:
    from multimodal_fl.federated.protocol import Kind

    assert Request("fit", 1).kind is Kind.FIT
    with pytest.raises(ValueError, match="unknown request kind 'fitt'"):
        Request("fitt", 1)
    arrays, config = Request(Kind.PREDICT, 2).to_records()
    config["kind"] = "nope"
    with pytest.raises(ValueError, match="unknown request kind"):
        Request.from_records(arrays, config)


def test_non_weight_arrays_and_documents_travel_apart_from_weights() -> None:
    from multimodal_fl.federated.protocol import Doc, Kind, pack_document

    request = Request(Kind.PCA_APPLY, 0, weights={"w": np.ones(2)},
                      arrays={"components": np.eye(2)}, config={"modality": "image"})
    back = Request.from_records(*request.to_records())
    assert set(back.weights) == {"w"} and set(back.arrays) == {"components"}
    np.testing.assert_array_equal(back.arrays["components"], np.eye(2))
    doc = {"auc": 0.75, "cells": [1, None], "nan": float("nan")}
    reply = Reply("a", Kind.PREDICT, 3, n_samples=4,
                  documents={Doc.EVALUATION: pack_document(doc)})
    again = Reply.from_records(*reply.to_records())
    got = again.document(Doc.EVALUATION)
    assert got["auc"] == 0.75 and got["cells"] == [1, None] and np.isnan(got["nan"])
    assert not again.arrays  # documents are not arrays
    with pytest.raises(InvalidReply, match="lacks the 'site_metrics' document"):
        again.document(Doc.SITE_METRICS)


def test_copies_share_nothing() -> None:
    from multimodal_fl.federated.protocol import Doc

    request = Request("fit", 1, {"w": np.zeros(2)}, {"lr": 0.1}, arrays={"e": np.zeros(1)})
    own = request.copy()
    own.weights["w"][0] = 1.0
    own.arrays["e"][0] = 1.0
    own.config["lr"] = 9.0
    assert request.weights["w"][0] == 0 and request.arrays["e"][0] == 0
    assert request.config["lr"] == 0.1
    reply = Reply("a", "fit", 1, weights={"w": np.zeros(2)}, documents={Doc.EVALUATION: "{}"})
    copy = reply.copy()
    copy.weights["w"][0] = 1.0
    copy.documents.clear()
    assert reply.weights["w"][0] == 0 and reply.documents


def test_fit_settings_travel_on_the_fit_request_only() -> None:
    from multimodal_fl.federated.protocol import FitSettings

    settings = FitSettings(seed=3, local_steps=7, lr=0.01, proximal_mu=0.5, fedbn=True)
    request = Request("fit", 2, config=settings.to_config())
    assert FitSettings.from_request(Request.from_records(*request.to_records())) == settings
    with pytest.raises(ValueError, match=r"lacks \['local_steps', 'lr'\]"):
        FitSettings.from_request(Request("fit", 2, config={"seed": 1}))
