"""The server loop on toy torch sites: oracles (one site == local training, identical copies,
FedProx mu=0), faults (raising, invalid replies, timeouts, min_sites), groups, FedBN, selection."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from toy import ToyNet, ToySite, bn_keys, initial_weights, to_numpy, to_torch, train_steps

from multimodal_fl.federated.aggregation import ServerOptimizer
from multimodal_fl.federated.checkpoint import CheckpointError, load_checkpoint
from multimodal_fl.federated.inprocess import InProcessFederation
from multimodal_fl.federated.protocol import (
    Reply,
    Request,
    SiteFailure,
    attach_evaluation,
    site_seed,
    split_carried,
)
from multimodal_fl.federated.server import (
    Federation,
    RoundFailed,
    RoundRecord,
    RunConfig,
    Site,
    run_federated,
    select_sites,
)

torch.set_num_threads(1)

FIT = {"local_steps": 3, "lr": 0.1}


def _run(sites: Mapping[str, Site], rounds: int = 2, **kw: object) -> tuple[dict, list]:
    config = RunConfig(rounds=rounds, fit_config=FIT, seed=3, **kw)  # type: ignore[arg-type]
    result = run_federated(InProcessFederation(sites), initial_weights(0), config)
    return result.weights, result.history


def _equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a
    )


def test_protocols_are_satisfied() -> None:
    fed = InProcessFederation({"a": ToySite("a")})
    assert isinstance(fed, Federation)
    assert isinstance(ToySite("a"), Site)


# ------------------------------------------------------------------------------------ oracles


def _local_training(site: ToySite, rounds: int, seed: int) -> dict[str, np.ndarray]:
    """Train one site alone; SGD state reset every round, as the site does (the stated rule)."""
    model = ToyNet()
    model.load_state_dict(to_torch(initial_weights(0)))
    for rnd in range(1, rounds + 1):
        g = torch.Generator().manual_seed(site_seed(seed, site.name, rnd))
        train_steps(model, site.x, site.y, steps=FIT["local_steps"], lr=FIT["lr"], generator=g)
    return to_numpy(model.state_dict())


def test_fedavg_one_site_equals_local_training() -> None:
    site = ToySite("solo", n=48)
    weights, history = _run({"solo": site}, rounds=3)
    assert [h.replied for h in history] == [["solo"]] * 3
    assert _equal(weights, _local_training(ToySite("solo", n=48), rounds=3, seed=3))


def test_fedavg_identical_copies_equal_one_site() -> None:
    copies = {f"copy{i}": ToySite(f"copy{i}", n=40, name_data_as="orig") for i in range(3)}
    weights, _ = _run(copies, rounds=3)
    alone = _local_training(ToySite("orig", n=40), rounds=3, seed=3)
    for key in alone:
        np.testing.assert_allclose(weights[key], alone[key], rtol=0, atol=1e-6, err_msg=key)
    # integer buffer rule: max over sites, equal to the local count here
    assert weights["encoder.1.num_batches_tracked"] == 3 * FIT["local_steps"]


def _three() -> dict[str, ToySite]:
    return {n: ToySite(n, n=32 + 16 * i, shift=0.3 * i) for i, n in enumerate("abc")}


def test_fedprox_mu_zero_equals_fedavg_and_mu_matters() -> None:
    fedavg, _ = _run(_three())
    prox0, _ = _run(_three(), optimizer=ServerOptimizer("fedprox"), proximal_mu=0.0)
    prox1, _ = _run(_three(), optimizer=ServerOptimizer("fedprox"), proximal_mu=1.0)
    assert _equal(fedavg, prox0)
    assert not _equal(fedavg, prox1)


def test_history_records_rounds() -> None:
    _, history = _run(_three(), rounds=2)
    assert [h.round for h in history] == [1, 2]
    h = history[-1]
    assert h.replied == ["a", "b", "c"] and h.failed == {} and h.rejected == {}
    assert h.n_samples == {"a": 32, "b": 48, "c": 64}
    losses = [h.fit_metrics[s]["loss"] for s in "abc"]
    assert h.train_loss == pytest.approx(np.average(losses, weights=[32, 48, 64]))
    assert set(h.eval_metrics) == {"a", "b", "c"} and "accuracy" in h.eval_metrics["a"]
    assert h.server_seconds >= 0 and h.seconds >= h.server_seconds


# ------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("nan", "non-finite"),
        ("shape", "shape"),
        ("missing", "missing keys: 'head.weight'"),
        ("extra", "unexpected keys"),
        ("dtype", "dtype float64, expected float32"),
        ("negative", "n_samples is -3"),
        ("groups", "group_counts['encoder.']"),
        ("identity", "names site 'someone_else'"),
    ],
)
def test_invalid_reply_is_rejected_named_and_round_goes_on(fault: str, words: str) -> None:
    sites = _three()
    sites["bad"] = ToySite("bad", fault=fault)
    weights, history = _run(sites, rounds=2)
    for h in history:
        assert h.replied == ["a", "b", "c"]
        assert list(h.rejected) == ["bad"] and words in h.rejected["bad"]
    clean, _ = _run(_three(), rounds=2)
    assert _equal(weights, clean)  # the rejected site left no trace in the weights


def test_raising_site_fails_then_is_asked_again() -> None:
    sites = _three()
    sites["flaky"] = ToySite("flaky", fault="raise", fault_rounds={1})
    _, history = _run(sites, rounds=2)
    assert "flaky crashed on purpose" in history[0].failed["flaky"]
    assert "RuntimeError" in history[0].failed["flaky"]
    assert history[1].replied == ["a", "b", "c", "flaky"]
    assert ("fit", 2) in sites["flaky"].calls


def test_timeout_turns_slow_site_into_failure() -> None:
    sites = _three()
    sites["slow"] = ToySite("slow", sleep=0.3)
    _, history = _run(sites, rounds=1, timeout=0.2)
    assert "timed out" in history[0].failed["slow"]
    assert history[0].replied == ["a", "b", "c"]


def test_min_sites_enforced_with_clear_error() -> None:
    sites = {
        "a": ToySite("a"),
        "b": ToySite("b", fault="raise"),
        "c": ToySite("c", fault="nan"),
    }
    with pytest.raises(RoundFailed) as info:
        _run(sites, rounds=1, min_sites=2, max_attempts=2)
    msg = str(info.value)
    assert info.value.round == 1
    assert "min_sites=2" in msg and "attempt 2" in msg
    assert "crashed on purpose" in msg and "non-finite" in msg


class _FailOnce:
    """Raises on its first fit request only (a transient fault within one round)."""

    def __init__(self, site: ToySite) -> None:
        self.site = site
        self.fits = 0

    def handle(self, request: Request) -> Reply:
        if request.kind == "fit":
            self.fits += 1
            if self.fits == 1:
                raise ConnectionError("link down")
        return self.site.handle(request)


def test_round_is_retried_until_min_sites_reply() -> None:
    sites: dict[str, Site] = dict(_three())
    sites["d"] = _FailOnce(ToySite("d"))
    _, history = _run(sites, rounds=1, min_sites=4, max_attempts=2)
    h = history[0]
    assert h.attempts == 2 and h.replied == ["a", "b", "c", "d"]
    assert "link down" in h.earlier_attempts[0]


def test_declared_size_caps_sample_count() -> None:
    class Liar(ToySite):
        def handle(self, request: Request) -> Reply:
            reply = super().handle(request)
            if request.kind == "fit":
                reply.n_samples = 10 * self.n
            return reply

    sites: dict[str, Site] = dict(_three())
    sites["liar"] = Liar("liar", n=20)
    _, history = _run(sites, rounds=1)
    assert "exceeds the training-set size 20" in history[0].rejected["liar"]


def test_evaluation_failure_is_recorded() -> None:
    class NoEval(ToySite):
        def handle(self, request: Request) -> Reply:
            if request.kind == "evaluate":
                raise ValueError("no validation split")
            return super().handle(request)

    sites: dict[str, Site] = dict(_three())
    sites["x"] = NoEval("x")
    _, history = _run(sites, rounds=1)
    assert "no validation split" in history[0].eval_failed["x"]
    assert "x" in history[0].replied


# ------------------------------------------------------------------------ groups, FedBN, order


def test_site_without_modality_does_not_dilute_its_encoder() -> None:
    sites = _three()
    sites["c"] = ToySite("c", n=64, shift=0.6, train_encoder=False)  # reports {"encoder.": 0}
    with_c, _ = _run(sites, rounds=1, evaluate_every=0)
    without_c, _ = _run({k: v for k, v in _three().items() if k != "c"}, rounds=1, evaluate_every=0)
    for key in with_c:
        if key.startswith("encoder."):
            assert with_c[key].tobytes() == without_c[key].tobytes(), key
    assert with_c["head.weight"].tobytes() != without_c["head.weight"].tobytes()


def test_fedbn_keeps_normalisation_local() -> None:
    init = initial_weights(0)
    weights, history = _run(_three(), rounds=2, fedbn=True)
    local = bn_keys(ToyNet())
    assert local and all(k.startswith("encoder.1.") for k in local)
    for key in local:
        np.testing.assert_array_equal(weights[key], init[key])  # server keeps its initial value
    assert not np.array_equal(weights["head.weight"], init["head.weight"])
    averaged, _ = _run(_three(), rounds=2)
    assert not np.array_equal(averaged["encoder.1.running_mean"], init["encoder.1.running_mean"])
    assert history[-1].rejected == {}


class _Reversed(InProcessFederation):
    """Returns replies in reverse order, as a network might."""

    def broadcast(
        self, requests: Mapping[str, Request], timeout: float | None = None
    ) -> dict[str, Reply | SiteFailure]:
        answers = super().broadcast(requests, timeout)
        return dict(reversed(list(answers.items())))


def test_result_does_not_depend_on_reply_order() -> None:
    config = RunConfig(rounds=2, fit_config=FIT, optimizer=ServerOptimizer("fedyogi", eta=0.05))
    a = run_federated(InProcessFederation(_three()), initial_weights(0), config).weights
    b = run_federated(_Reversed(_three()), initial_weights(0), config).weights
    assert _equal(a, b)


def test_select_sites_is_deterministic_and_respects_min_sites() -> None:
    names = [f"s{i}" for i in range(10)]
    one = select_sites(names, fraction=0.3, min_sites=1, seed=0, round=1)
    assert one == select_sites(list(reversed(names)), fraction=0.3, min_sites=1, seed=0, round=1)
    assert len(one) == 3 and one == sorted(one)
    draws = {
        tuple(select_sites(names, fraction=0.3, min_sites=1, seed=0, round=r)) for r in range(1, 9)
    }
    assert len(draws) > 1
    assert len(select_sites(names, fraction=0.1, min_sites=4, seed=0, round=1)) == 4
    assert select_sites(names[:2], fraction=0.5, min_sites=5, seed=0, round=1) == names[:2]


def test_fraction_asks_only_drawn_sites() -> None:
    sites = _three()
    _, history = _run(sites, rounds=3, fraction=0.5)
    for h in history:
        assert len(h.selected) == 2 and h.replied == h.selected
        for name, site in sites.items():
            assert (("fit", h.round) in site.calls) == (name in h.selected)


# --------------------------------------------------------------------------- in-process details


def test_inprocess_failures_and_copies() -> None:
    class Mutator(ToySite):
        def handle(self, request: Request) -> Reply:
            for value in request.weights.values():
                value[...] = 0
            return Reply(self.name, request.kind, request.round, n_samples=1)

    class NotAReply:
        def handle(self, request: Request) -> object:
            return {"weights": {}}

    fed = InProcessFederation({"m": Mutator("m"), "x": NotAReply()})  # type: ignore[dict-item]
    weights = {"w": np.ones(3)}
    answers = fed.broadcast({k: Request("fit", 1, weights, {}) for k in ("m", "x", "zz")})
    np.testing.assert_array_equal(weights["w"], np.ones(3))  # the site got a copy
    assert isinstance(answers["m"], Reply)
    assert isinstance(answers["x"], SiteFailure) and "expected a Reply" in answers["x"].reason
    assert isinstance(answers["zz"], SiteFailure) and "unknown site 'zz'" in answers["zz"].reason
    assert set(fed.last_site_seconds) == {"m", "x"}  # per-site handle time, unknown sites aside
    with pytest.raises(TypeError, match="handle"):
        InProcessFederation({"bad": object()})  # type: ignore[dict-item]


def test_run_config_validation_names_fields() -> None:
    with pytest.raises(ValueError, match=r"min_sites=0.*fraction=1.5"):
        RunConfig(rounds=1, min_sites=0, fraction=1.5)


def test_existing_checkpoint_needs_resume(tmp_path: Path) -> None:
    config = RunConfig(rounds=1, fit_config=FIT)
    run_federated(
        InProcessFederation(_three()), initial_weights(0), config, checkpoint_dir=tmp_path
    )
    with pytest.raises(CheckpointError, match="resume=True"):
        run_federated(
            InProcessFederation(_three()), initial_weights(0), config, checkpoint_dir=tmp_path
        )
    other = RunConfig(rounds=2, fit_config=FIT, seed=9)
    with pytest.raises(CheckpointError, match=r"\['seed'\]"):
        run_federated(
            InProcessFederation(_three()),
            initial_weights(0),
            other,
            checkpoint_dir=tmp_path,
            resume=True,
        )


# ---------------------------------------------------- one exchange per round (evaluation carried)


class _Carrying:
    """A toy site answering a carried evaluation as FusionSite's gate does: evaluate, then fit."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def handle(self, request: Request) -> Reply:
        fit, evaluation = split_carried(request)
        if evaluation is None:
            return self.site.handle(request)
        carried: Reply | str
        try:
            carried = self.site.handle(evaluation)
        except Exception as exc:
            carried = f"{type(exc).__name__}: {exc}"
        return attach_evaluation(self.site.handle(fit), carried)


class _Counting(InProcessFederation):
    """Counts broadcasts (message exchanges) and the request kinds of each."""

    def __init__(self, sites: Mapping[str, Site]) -> None:
        super().__init__(sites)
        self.exchanges: list[list[str]] = []

    def broadcast(
        self, requests: Mapping[str, Request], timeout: float | None = None
    ) -> dict[str, Reply | SiteFailure]:
        self.exchanges.append(sorted({str(r.kind) for r in requests.values()}))
        return super().broadcast(requests, timeout)


def _carried_run(carry: bool, rounds: int, **kw: object) -> tuple[dict, list, list, _Counting]:
    sites: dict[str, Site] = {k: _Carrying(v) for k, v in _three().items()}
    federation = _Counting(sites)
    seen: list[tuple[RoundRecord, dict]] = []
    config = RunConfig(rounds=rounds, fit_config=FIT, seed=3, carry_evaluation=carry,
                       **kw)  # type: ignore[arg-type]
    result = run_federated(federation, initial_weights(0), config,
                           on_round=lambda r, w: seen.append((r, dict(w))))
    return result.weights, result.history, seen, federation


@pytest.mark.parametrize("fraction", [1.0, 0.6])
def test_carried_evaluation_gives_the_same_rounds_in_one_exchange_each(fraction: float) -> None:
    """Round k's evaluation rides round k+1's fit: same weights, records and on_round calls."""
    w0, h0, seen0, fed0 = _carried_run(False, 3, fraction=fraction, min_sites=2)
    w1, h1, seen1, fed1 = _carried_run(True, 3, fraction=fraction, min_sites=2)
    assert _equal(w0, w1)
    assert [h.deterministic() for h in h0] == [h.deterministic() for h in h1]
    assert all(set(h.eval_metrics) == {"a", "b", "c"} for h in h1)
    assert [r.round for r, _ in seen1] == [1, 2, 3]
    assert all(_equal(a, b) for (_, a), (_, b) in zip(seen0, seen1, strict=True))
    # info, then fit + evaluate per round; carried: one exchange per round and a last evaluate
    assert fed0.exchanges == [["info"]] + [["fit"], ["evaluate"]] * 3
    expected = ["fit"] if fraction == 1.0 else ["evaluate", "fit"]  # unselected: evaluate only
    assert fed1.exchanges == [["info"], ["fit"], expected, expected, ["evaluate"]]


def test_carried_evaluation_failure_is_recorded_for_its_round() -> None:
    class NoEval(ToySite):
        def handle(self, request: Request) -> Reply:
            if request.kind == "evaluate":
                raise ValueError("no validation split")
            return super().handle(request)

    sites: dict[str, Site] = {k: _Carrying(v) for k, v in _three().items()}
    sites["x"] = _Carrying(NoEval("x"))
    config = RunConfig(rounds=2, fit_config=FIT, carry_evaluation=True)
    history = run_federated(InProcessFederation(sites), initial_weights(0), config).history
    assert [set(h.eval_metrics) for h in history] == [{"a", "b", "c"}] * 2
    assert all("no validation split" in h.eval_failed["x"] for h in history)
    assert all("x" in h.replied for h in history)


def test_a_failed_round_keeps_the_previous_round_and_its_carried_evaluation(
    tmp_path: Path,
) -> None:
    def run(carry: bool, where: Path) -> RoundRecord:
        sites: dict[str, Site] = {k: _Carrying(v) for k, v in _three().items()}
        sites["d"] = _Carrying(ToySite("d", fault="raise", fault_rounds={2}))
        config = RunConfig(rounds=3, fit_config=FIT, min_sites=4, carry_evaluation=carry)
        with pytest.raises(RoundFailed, match="round 2 did not complete"):
            run_federated(InProcessFederation(sites), initial_weights(0), config,
                          checkpoint_dir=where)
        found = load_checkpoint(where)
        assert found is not None and found.round == 1
        return RoundRecord(**found.meta["history"][-1])

    plain, carried = run(False, tmp_path / "plain"), run(True, tmp_path / "carried")
    assert set(carried.eval_metrics) == {"a", "b", "c", "d"}
    assert carried.deterministic() == plain.deterministic()


class JoinsLate:
    """An in-process federation whose site ``late`` connects once round 1's fit is sent."""

    def __init__(self, sites: Mapping[str, Site], late: str) -> None:
        self.inner, self.late, self.connected = InProcessFederation(sites), late, False
        self.asked: list[tuple[str, str]] = []

    def sites(self) -> list[str]:
        return [s for s in self.inner.sites() if self.connected or s != self.late]

    def broadcast(self, requests: Mapping[str, Request], timeout: float | None = None
                  ) -> dict[str, Reply | SiteFailure]:
        self.asked += [(s, r.kind) for s, r in requests.items()]
        self.connected |= any(r.kind == "fit" for r in requests.values())
        return self.inner.broadcast(requests, timeout)


def test_a_site_that_connects_after_the_start_is_never_asked(
        caplog: pytest.LogCaptureFixture) -> None:
    """Its SuperNode started late: it declared no size (no cap on its sample count) and the
    run's setup never saw it, so it is left out of the run, logged once."""
    federation = JoinsLate(_three(), "c")
    with caplog.at_level("WARNING"):
        result = run_federated(federation, initial_weights(0),  # type: ignore[arg-type]
                               RunConfig(rounds=3, fit_config=FIT, seed=3))
    assert [s for s, _ in federation.asked if s == "c"] == []
    assert all(h.selected == ["a", "b"] for h in result.history)
    lines = [r.getMessage() for r in caplog.records if "joined after" in r.getMessage()]
    assert lines == ["site c joined after the run's setup: left out of this run (start every "
                     "SuperNode before `mmfl flower run`)"]


class DeclinesEvaluation:
    """A toy site whose policy does not answer evaluate requests."""

    def __init__(self, site: ToySite) -> None:
        self.site = site

    def handle(self, request: Request) -> Reply:
        if request.kind == "evaluate":
            raise RuntimeError("site c: does not answer 'evaluate' requests")
        return self.site.handle(request)


def test_every_failed_evaluation_is_logged_once_per_round(
        caplog: pytest.LogCaptureFixture) -> None:
    """docs/deployment.md: each refusal has its line in the ServerApp's log; a declined
    evaluation had none (the round table showed 'failed: -')."""
    sites = {**_three(), "c": DeclinesEvaluation(ToySite("c", n=64, shift=0.6))}
    with caplog.at_level("WARNING"):
        _, history = _run(sites, rounds=2)  # type: ignore[arg-type]
    assert [h.eval_failed for h in history] == [
        {"c": "RuntimeError: site c: does not answer 'evaluate' requests"}] * 2
    lines = [r.getMessage() for r in caplog.records if "evaluation: site" in r.getMessage()]
    assert lines == [f"round {n} evaluation: site c failed: RuntimeError: site c: does not "
                     "answer 'evaluate' requests" for n in (1, 2)]
