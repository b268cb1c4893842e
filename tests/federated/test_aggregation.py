"""Aggregation on small arrays: FedAvg, parameter groups, integer buffers, FedBN, server steps,
reply checks, federated moments, the FedProx term."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimodal_fl.federated.aggregation import (
    ServerOptimizer,
    aggregate,
    check_evaluate_reply,
    check_fit_reply,
    column_moments,
    group_of,
    merge_moments,
    server_step,
)
from multimodal_fl.federated.protocol import InvalidReply, Reply
from multimodal_fl.federated.proximal import proximal_term

RNG = np.random.default_rng(0)


def _state(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "enc.text.w": (RNG.standard_normal((3, 2)) * scale).astype(np.float32),
        "enc.img.w": (RNG.standard_normal(4) * scale).astype(np.float32),
        "head.b": (RNG.standard_normal(1) * scale).astype(np.float64),
        "bn.running_var": RNG.random(2).astype(np.float32),
        "bn.num_batches_tracked": np.array(int(RNG.integers(0, 100)), dtype=np.int64),
        "mask": RNG.random(3) > 0.5,
    }


def _reply(site: str, state: dict[str, np.ndarray], n: int, **kw: object) -> Reply:
    return Reply(site=site, kind="fit", round=1, weights=state, n_samples=n, **kw)  # type: ignore[arg-type]


def test_plain_fedavg_matches_formula() -> None:
    a, b = _state(), _state()
    out = aggregate([_reply("a", a, 3), _reply("b", b, 1)], a)  # no groups: plain FedAvg
    expected = (3 * a["enc.text.w"].astype(np.float64) + b["enc.text.w"]) / 4
    np.testing.assert_allclose(out["enc.text.w"], expected, rtol=1e-6)
    assert out["enc.text.w"].dtype == np.float32 and out["head.b"].dtype == np.float64
    # integer buffers: element-wise max; booleans: any
    assert out["bn.num_batches_tracked"] == max(
        a["bn.num_batches_tracked"], b["bn.num_batches_tracked"]
    )
    assert out["bn.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(out["mask"], a["mask"] | b["mask"])
    # buffers that are floats (running statistics) are averaged like weights
    np.testing.assert_allclose(
        out["bn.running_var"], (3 * a["bn.running_var"] + b["bn.running_var"]) / 4, rtol=1e-6
    )


def test_single_site_average_is_exact() -> None:
    a = _state()
    out = aggregate([_reply("a", a, 37)], a)
    for key, value in a.items():
        np.testing.assert_array_equal(out[key], value)
        assert out[key].dtype == value.dtype


def test_aggregate_independent_of_reply_order() -> None:
    states = {name: _state() for name in "dcba"}
    replies = [_reply(n, s, 10 + i) for i, (n, s) in enumerate(states.items())]
    base = next(iter(states.values()))
    forward = aggregate(replies, base)
    backward = aggregate(list(reversed(replies)), base)
    for key in forward:
        assert forward[key].tobytes() == backward[key].tobytes()


def test_group_of_takes_longest_prefix() -> None:
    groups = ["enc.", "enc.text.", "head."]
    assert group_of("enc.text.w", groups) == "enc.text."
    assert group_of("enc.img.w", groups) == "enc."
    assert group_of("bn.w", groups) is None


def test_group_counts_exclude_sites_that_did_not_train() -> None:
    g = _state()
    a, b, c = _state(), _state(), _state()
    replies = [
        _reply("a", a, 10, group_counts={"enc.text.": 10}),
        _reply("b", b, 30, group_counts={"enc.text.": 0}),  # no notes at b
        _reply("c", c, 20),  # lists no group: counts n_samples for every key
    ]
    out = aggregate(replies, g)
    text = (10 * a["enc.text.w"].astype(np.float64) + 20 * c["enc.text.w"]) / 30
    np.testing.assert_allclose(out["enc.text.w"], text, rtol=1e-6)
    img = (10 * a["enc.img.w"].astype(np.float64) + 30 * b["enc.img.w"] + 20 * c["enc.img.w"]) / 60
    np.testing.assert_allclose(out["enc.img.w"], img, rtol=1e-6)


def test_each_site_resolves_groups_among_its_own_prefixes() -> None:
    g, a, b = _state(), _state(), _state()
    replies = [
        _reply("a", a, 10, group_counts={"enc.text.": 4}),
        _reply("b", b, 30, group_counts={"enc.": 0}),  # b trained no encoder at all
    ]
    out = aggregate(replies, g)
    np.testing.assert_array_equal(out["enc.text.w"], a["enc.text.w"])
    np.testing.assert_array_equal(out["enc.img.w"], a["enc.img.w"])
    np.testing.assert_allclose(
        out["head.b"], (10 * a["head.b"] + 30 * b["head.b"]) / 40, rtol=1e-12
    )


def test_group_nobody_trained_keeps_global_value() -> None:
    g = _state()
    replies = [
        _reply("a", _state(), 10, group_counts={"enc.text.": 0}),
        _reply("b", _state(), 5, group_counts={"enc.text.": 0}),
    ]
    out = aggregate(replies, g)
    assert "enc.text.w" not in out and "enc.img.w" in out
    new, _ = server_step(g, out, {}, ServerOptimizer("fedadam", eta=0.1))
    np.testing.assert_array_equal(new["enc.text.w"], g["enc.text.w"])


def test_fedbn_local_keys_are_not_aggregated() -> None:
    g = _state()
    local = ["bn.running_var", "bn.num_batches_tracked"]
    a = {k: v for k, v in _state().items() if k not in local}
    out = aggregate([_reply("a", a, 10, local_keys=local)], g)
    assert not set(local) & set(out)
    new, _ = server_step(g, out, {}, ServerOptimizer())
    for key in local:
        np.testing.assert_array_equal(new[key], g[key])


def test_fedavg_server_step() -> None:
    g, avg = _state(), _state()
    new, state = server_step(g, avg, {}, ServerOptimizer())
    assert state == {}
    for key in g:
        np.testing.assert_array_equal(new[key], avg[key])
    half, _ = server_step(g, avg, {}, ServerOptimizer(eta=0.5))
    np.testing.assert_allclose(
        half["enc.img.w"], (g["enc.img.w"].astype(np.float64) + avg["enc.img.w"]) / 2, rtol=1e-6
    )
    # integer buffers take the aggregated value, not an interpolation
    assert half["bn.num_batches_tracked"] == avg["bn.num_batches_tracked"]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_step_is_sign_step_without_momentum(name: str) -> None:
    # beta1 = beta2 = 0 and tiny tau: m = delta, v ~ delta^2, so x moves by eta * sign(delta)
    g = {"w": np.array([1.0, -2.0, 0.5]), "k": np.array(3)}
    avg = {"w": np.array([3.0, -5.0, 0.25]), "k": np.array(4)}
    opt = ServerOptimizer(name, eta=0.01, beta1=0.0, beta2=0.0, tau=1e-9)  # type: ignore[arg-type]
    new, state = server_step(g, avg, {}, opt)
    np.testing.assert_allclose(new["w"], g["w"] + 0.01 * np.sign(avg["w"] - g["w"]), rtol=1e-6)
    assert new["k"] == 4 and "m/k" not in state
    assert set(state) == {"m/w", "v/w"} and state["v/w"].dtype == np.float64


def test_fedadam_momentum_accumulates_and_state_roundtrips() -> None:
    g = {"w": np.zeros(2, dtype=np.float32)}
    opt = ServerOptimizer("fedadam", eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    one, s1 = server_step(g, {"w": np.ones(2, dtype=np.float32)}, {}, opt)
    np.testing.assert_allclose(s1["m/w"], 0.1)  # (1 - beta1) * delta
    np.testing.assert_allclose(s1["v/w"], 0.99 * 1e-6 + 0.01)
    # no new delta: momentum alone still moves x in the same direction
    two, s2 = server_step(one, {"w": one["w"].copy()}, s1, opt)
    assert (two["w"] > one["w"]).all()
    np.testing.assert_allclose(s2["m/w"], 0.09)


def test_fedyogi_second_moment_moves_towards_delta_squared() -> None:
    g = {"w": np.zeros(1)}
    opt = ServerOptimizer("fedyogi", beta2=0.5, tau=1e-3)
    _, state = server_step(
        g, {"w": np.array([0.1])}, {"m/w": np.zeros(1), "v/w": np.array([1.0])}, opt
    )
    np.testing.assert_allclose(state["v/w"], 1.0 - 0.5 * 0.01)  # v > delta^2: v shrinks additively


def test_server_optimizer_validates() -> None:
    with pytest.raises(ValueError, match="unknown server algorithm"):
        ServerOptimizer("fedsgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eta"):
        ServerOptimizer(eta=0)


def _good() -> tuple[dict[str, np.ndarray], Reply]:
    ref = _state()
    return ref, _reply("a", {k: v.copy() for k, v in ref.items()}, 10, metrics={"loss": 0.5})


def test_check_accepts_good_reply() -> None:
    ref, reply = _good()
    check_fit_reply(reply, site="a", round=1, reference=ref, max_samples=10)


def _break(reply: Reply, what: str) -> None:
    if what == "nan":
        reply.weights["enc.img.w"][1] = np.nan
    elif what == "inf":
        reply.weights["head.b"][0] = np.inf
    elif what == "shape":
        reply.weights["enc.img.w"] = np.zeros(5, dtype=np.float32)
    elif what == "dtype":
        reply.weights["enc.img.w"] = reply.weights["enc.img.w"].astype(np.float16)
    elif what == "missing":
        del reply.weights["head.b"]
    elif what == "extra":
        reply.weights["extra"] = np.zeros(1)
    elif what == "negative":
        reply.n_samples = -1
    elif what == "zero":
        reply.n_samples = 0
    elif what == "float_count":
        reply.n_samples = 2.5  # type: ignore[assignment]
    elif what == "too_many":
        reply.n_samples = 11
    elif what == "group":
        reply.group_counts = {"enc.": 12}
    elif what == "site":
        reply.site = "b"
    elif what == "round":
        reply.round = 2
    elif what == "metric":
        reply.metrics = {"loss": float("nan")}
    elif what == "local":
        reply.local_keys = ["bn.running_var"]


@pytest.mark.parametrize(
    ("what", "words"),
    [
        ("nan", "'enc.img.w' has 1 non-finite"),
        ("inf", "'head.b' has 1 non-finite"),
        ("shape", "shape (5,), expected (4,)"),
        ("dtype", "dtype float16, expected float32"),
        ("missing", "missing keys: 'head.b'"),
        ("extra", "unexpected keys: 'extra'"),
        ("negative", "n_samples is -1"),
        ("zero", "n_samples is 0"),
        ("float_count", "n_samples is 2.5"),
        ("too_many", "exceeds the training-set size 10"),
        ("group", "group_counts['enc.'] is 12"),
        ("site", "names site 'b'"),
        ("round", "round 2"),
        ("metric", "metric 'loss'"),
        ("local", "FedBN is off"),
    ],
)
def test_check_rejects_and_names_site(what: str, words: str) -> None:
    ref, reply = _good()
    _break(reply, what)
    with pytest.raises(InvalidReply) as info:
        check_fit_reply(reply, site="a", round=1, reference=ref, max_samples=10)
    assert info.value.site == "a"
    assert words in info.value.reason


def test_check_fedbn_local_keys_may_be_omitted() -> None:
    ref, reply = _good()
    del reply.weights["bn.running_var"]
    reply.local_keys = ["bn.running_var"]
    check_fit_reply(reply, site="a", round=1, reference=ref, allow_local_keys=True)
    reply.local_keys = ["not.a.key"]
    with pytest.raises(InvalidReply, match="local_keys not in the model"):
        check_fit_reply(reply, site="a", round=1, reference=ref, allow_local_keys=True)


def test_check_accepts_absent_keys_only_of_a_group_counted_zero() -> None:
    ref, reply = _good()
    reply.group_counts = {"enc.img.": 0, "enc.text.": 10}
    del reply.weights["enc.img.w"]  # a group the site's gate left out: count 0, not sent
    check_fit_reply(reply, site="a", round=1, reference=ref, max_samples=10)
    del reply.weights["enc.text.w"]  # its group counts 10: its keys must be there
    with pytest.raises(InvalidReply, match=r"missing keys: 'enc\.text\.w'"):
        check_fit_reply(reply, site="a", round=1, reference=ref, max_samples=10)
    _, other = _good()
    del other.weights["head.b"]  # in no group: counts n_samples, so it must be there
    other.group_counts = {"enc.img.": 0}
    with pytest.raises(InvalidReply, match=r"missing keys: 'head\.b'"):
        check_fit_reply(other, site="a", round=1, reference=ref, max_samples=10)


def test_aggregate_keeps_the_global_value_of_a_group_left_out() -> None:
    g, a, b = _state(), _state(), _state()
    del a["enc.img.w"]
    replies = [_reply("a", a, 10, group_counts={"enc.img.": 0}), _reply("b", b, 30)]
    out = aggregate(replies, g)
    np.testing.assert_array_equal(out["enc.img.w"], b["enc.img.w"])  # b alone trained it
    alone = aggregate(replies[:1], g)
    assert "enc.img.w" not in alone  # nobody sent it: the server keeps the global value
    new, _ = server_step(g, alone, {}, ServerOptimizer())
    np.testing.assert_array_equal(new["enc.img.w"], g["enc.img.w"])


def test_check_evaluate_reply() -> None:
    good = Reply("a", "evaluate", 2, n_samples=0, metrics={"auc": 0.7})
    check_evaluate_reply(good, site="a", round=2)
    bad = Reply("a", "evaluate", 2, n_samples=3, metrics={"auc": float("inf")})
    with pytest.raises(InvalidReply, match="'auc'"):
        check_evaluate_reply(bad, site="a", round=2)


def test_merge_moments_equals_pooled() -> None:
    parts = [RNG.standard_normal((n, 3)) * 2 + 5 for n in (4, 11, 30)]
    pooled = np.concatenate(parts)
    n, mean, var = merge_moments([column_moments(p) for p in parts])
    np.testing.assert_array_equal(n, [45, 45, 45])
    np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, pooled.var(axis=0), rtol=1e-10)
    _, _, var1 = merge_moments([column_moments(p) for p in parts], ddof=1)
    np.testing.assert_allclose(var1, pooled.var(axis=0, ddof=1), rtol=1e-10)


def test_merge_moments_skips_missing_values() -> None:
    a = np.array([[1.0, np.nan], [3.0, 4.0]])
    b = np.array([[np.nan, 8.0], [5.0, np.nan]])
    n, mean, var = merge_moments([column_moments(a), column_moments(b)])
    pooled = np.concatenate([a, b])
    np.testing.assert_array_equal(n, [3, 2])
    np.testing.assert_allclose(mean, np.nanmean(pooled, axis=0))
    np.testing.assert_allclose(var, np.nanvar(pooled, axis=0))
    with pytest.raises(ValueError, match="at least one"):
        merge_moments([])


def test_proximal_term_value_and_gradient() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    g = {"w": torch.tensor([0.5, 3.0])}
    term = proximal_term([("w", w)], g, mu=0.2)
    assert term.item() == pytest.approx(0.1 * (0.25 + 1.0))
    term.backward()
    assert w.grad is not None
    torch.testing.assert_close(w.grad, 0.2 * (w.detach() - g["w"]))
    w.grad = None
    proximal_term([("w", w)], g, mu=0.0).backward()
    assert w.grad is not None and bool((w.grad == 0).all())
    with pytest.raises(KeyError, match="'v'"):
        proximal_term([("v", w)], g, mu=0.1)
