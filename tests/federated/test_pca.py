"""Tests for multimodal_fl.federated.pca: the oracle is scikit-learn's PCA on the pooled data."""

from __future__ import annotations

import itertools
import pickle
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from scipy import linalg
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.utils.estimator_checks import check_estimator

from multimodal_fl.federated.pca import (
    SUMMARY_KEYS,
    SVD_SOLVERS,
    FederatedPCA,
    PCASummary,
    SummaryError,
    TruncationWarning,
    local_summary,
    merge,
    resolve_solver,
    server_pca_merge,
    site_pca_reply,
    subspace_error,
)
from multimodal_fl.federated.protocol import InvalidReply

TOL = 1e-10


def make_sites(
    sizes: list[int],
    d: int,
    *,
    seed: int = 0,
    signal: int = 5,
    shift: float = 3.0,
) -> list[np.ndarray]:
    """Sites sharing a low-rank structure with a clear spectral gap, each with its own mean."""
    rng = np.random.default_rng(seed)
    basis = linalg.qr(rng.normal(size=(d, d)))[0]
    scales = np.concatenate([np.linspace(10.0, 5.0, signal), np.full(d - signal, 0.1)])
    return [
        (rng.normal(size=(n, d)) * scales) @ basis.T + shift * rng.normal(size=d) for n in sizes
    ]


def pooled(sites: list[np.ndarray], k: int | None) -> PCA:
    return PCA(n_components=k, svd_solver="full").fit(np.vstack(sites))


def assert_same_fit(a: FederatedPCA | PCA, b: FederatedPCA | PCA, *, tol: float = TOL) -> None:
    assert subspace_error(a.components_, b.components_) <= tol
    # each component individually equal up to sign (spectrum with distinct values)
    dots = np.abs(np.sum(a.components_ * b.components_, axis=1))
    np.testing.assert_allclose(dots, 1.0, rtol=0, atol=tol)
    np.testing.assert_allclose(a.explained_variance_, b.explained_variance_, rtol=tol)
    np.testing.assert_allclose(a.explained_variance_ratio_, b.explained_variance_ratio_, rtol=tol)
    np.testing.assert_allclose(a.singular_values_, b.singular_values_, rtol=tol)
    np.testing.assert_allclose(a.mean_, b.mean_, rtol=tol, atol=tol)
    assert a.n_samples_ == b.n_samples_


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    ("sizes", "d", "k"),
    [
        ([200, 15, 90, 7], 40, 5),  # different sizes; d > two sites' n
        ([3, 4, 120], 30, 5),  # tiny sites
        ([60, 60], 8, 8),  # all components, n > d
        ([30, 25, 20], 100, 5),  # d > every site's n and > half the pooled n
    ],
)
@pytest.mark.parametrize("svd_solver", SVD_SOLVERS)
def test_matches_pooled_sklearn_pca(sizes: list[int], d: int, k: int, svd_solver: str) -> None:
    sites = make_sites(sizes, d, seed=sum(sizes))
    ref = pooled(sites, k)
    fed = FederatedPCA(k, svd_solver=svd_solver).fit_sites(sites)
    assert_same_fit(fed, ref)
    assert fed.n_components_ == k and fed.n_features_in_ == d
    np.testing.assert_allclose(fed.noise_variance_, ref.noise_variance_, rtol=1e-8, atol=1e-12)
    assert not fed.truncated_ and fed.subspace_error_bound_ == 0.0
    # same sign convention as scikit-learn (svd_flip on the rows of Vt)
    np.testing.assert_allclose(fed.components_, ref.components_, atol=TOL)


def test_auto_solver_policy() -> None:
    """auto: the Gram matrix wherever the matrix has at least d rows, else QR/SVD."""
    assert resolve_solver("auto", 100, 40) == "covariance_eigh"
    assert resolve_solver("auto", 40, 40) == "covariance_eigh"
    assert resolve_solver("auto", 39, 40) == "full"
    assert resolve_solver("full", 100, 40) == "full"
    assert resolve_solver("covariance_eigh", 10, 40) == "covariance_eigh"
    with pytest.raises(ValueError, match="svd_solver='svd'; expected one of 'auto'"):
        resolve_solver("svd", 10, 4)
    with pytest.raises(ValueError, match="svd_solver"):
        local_summary(np.ones((5, 3)), svd_solver="eig")
    with pytest.raises(ValueError, match="svd_solver"):
        FederatedPCA(2, svd_solver="arpack").fit(np.random.default_rng(0).normal(size=(9, 4)))


def test_full_solver_keeps_small_components_covariance_eigh_does_not() -> None:
    """The documented trade-off: the Gram matrix squares the condition number.

    Explained variances spread over 13 decades: the QR/SVD path keeps every one to
    better than 1e-8 relative; the covariance path is as accurate for the leading
    components but loses digits on the smallest ones.
    """
    rng = np.random.default_rng(61)
    d = 20
    basis = linalg.qr(rng.normal(size=(d, d)))[0]
    sv = np.logspace(0, -7, d)
    sites = []
    for n in (120, 90, 60):
        u = linalg.qr(rng.normal(size=(n, d)), mode="economic")[0]
        sites.append((u * sv) @ basis.T * np.sqrt(n) + rng.normal(size=d))
    ref = pooled(sites, d)
    rel = {}
    for solver in ("full", "covariance_eigh"):
        fed = FederatedPCA(d, svd_solver=solver).fit_sites(sites)
        rel[solver] = np.abs(fed.explained_variance_ / ref.explained_variance_ - 1.0)
        assert subspace_error(fed.components_[:3], ref.components_[:3]) <= TOL
        assert rel[solver][:3].max() <= TOL
    assert rel["full"].max() < 1e-8  # measured ~2e-11
    assert rel["covariance_eigh"].max() > 1e-6  # measured ~6e-4


def test_naive_merge_without_correction_rows_is_wrong() -> None:
    """Stacking the blocks alone loses between-site scatter: wrong when site means differ."""
    sites = make_sites([80, 50, 120], 20, seed=3, shift=15.0)
    k = 4
    ref = pooled(sites, k)
    summaries = [local_summary(x) for x in sites]
    # naive variant, written here on purpose (the package never does this)
    stacked = np.vstack([s.block for s in summaries])
    _, s_naive, vt_naive = linalg.svd(stacked, full_matrices=False)
    n = sum(x.shape[0] for x in sites)
    naive_ev = s_naive[:k] ** 2 / (n - 1)
    assert subspace_error(vt_naive[:k], ref.components_) > 0.1
    assert not np.allclose(naive_ev, ref.explained_variance_, rtol=0.01)
    # the real merge, with correction rows, is right on the same summaries
    fed = FederatedPCA(k).fit_from_summaries(summaries)
    assert_same_fit(fed, ref)


def test_single_site_fit_equals_sklearn_and_transforms() -> None:
    (x,) = make_sites([150], 12, seed=5)
    for whiten in (False, True):
        ref = PCA(6, svd_solver="full", whiten=whiten).fit(x)
        fed = FederatedPCA(6, whiten=whiten).fit(x)
        assert_same_fit(fed, ref)
        np.testing.assert_allclose(fed.transform(x), ref.transform(x), atol=1e-9)
        z = ref.transform(x[:5])
        np.testing.assert_allclose(fed.inverse_transform(z), ref.inverse_transform(z), atol=1e-9)


@pytest.mark.parametrize("whiten", [False, True])
def test_transform_inverse_round_trip_with_all_components(whiten: bool) -> None:
    sites = make_sites([40, 35], 10, seed=7)
    fed = FederatedPCA(10, whiten=whiten).fit_sites(sites)
    x = np.vstack(sites)
    np.testing.assert_allclose(fed.inverse_transform(fed.transform(x)), x, atol=1e-9)
    if whiten:
        np.testing.assert_allclose(np.var(fed.transform(x), axis=0, ddof=1), 1.0, rtol=1e-9)


# --------------------------------------------------------------------------- merge algebra


def test_merge_is_associative_any_order_and_tree() -> None:
    sites = make_sites([50, 9, 70, 33], 25, seed=11)
    summaries = [local_summary(x) for x in sites]
    k = 5
    ref = FederatedPCA(k).fit_from_summaries(summaries)
    for order in itertools.permutations(range(4)):
        fed = FederatedPCA(k).fit_from_summaries([summaries[i] for i in order])
        assert_same_fit(fed, ref)
    a, b, c, d = summaries
    trees = [
        [merge([a, b]), merge([c, d])],
        [merge([merge([d, a]), c]), b],
        [a, merge([b, merge([c, d])])],
    ]
    for tree in trees:
        fed = FederatedPCA(k).fit_from_summaries(tree)
        assert_same_fit(fed, ref)
        np.testing.assert_allclose(merge(tree).total_ss, merge(summaries).total_ss, rtol=TOL)
    # pairwise sequential merging equals the one-shot merge
    running = a
    for s in (b, c, d):
        running = merge([running, s])
    whole = merge(summaries)
    assert running.n == whole.n
    np.testing.assert_allclose(running.mean, whole.mean, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(
        running.block.T @ running.block,
        whole.block.T @ whole.block,
        rtol=1e-9,
        atol=1e-9 * np.abs(whole.block).max() ** 2,
    )
    assert_same_fit(ref, pooled(sites, k))


def test_incremental_site_adds_data_equals_refit() -> None:
    a, b, c, b_new = make_sites([60, 40, 55, 25], 18, seed=13)
    k = 4
    fed = FederatedPCA(k).fit_sites([a, b, c])
    fed.partial_fit_summary(fed.local_summary(b_new))
    assert_same_fit(fed, pooled([a, np.vstack([b, b_new]), c], k))
    # partial_fit on raw data, starting unfitted, is the same thing
    inc = FederatedPCA(k)
    for x in (a, b, c, b_new):
        inc.partial_fit(x)
    assert_same_fit(inc, fed)


# --------------------------------------------------------------------------- truncation


def test_site_rank_truncation_is_reported_and_bounded() -> None:
    sites = make_sites([200, 150, 180], 30, seed=17)
    k = 5
    ref = pooled(sites, k)
    with pytest.warns(TruncationWarning, match="site_rank=7"):
        fed = FederatedPCA(k, site_rank=7).fit_sites(sites)
    assert fed.truncated_
    err = subspace_error(fed.components_, ref.components_)
    assert 0 < fed.subspace_error_bound_ < 1
    assert err <= fed.subspace_error_bound_
    # the bound for every leading-j prefix holds too, and the last one is the bound for all k
    assert fed.subspace_error_bounds_.shape == (k,)
    assert fed.subspace_error_bounds_[-1] == fed.subspace_error_bound_
    for j in range(1, k + 1):
        err_j = subspace_error(fed.components_[:j], ref.components_[:j])
        assert 0 < err_j <= fed.subspace_error_bounds_[j - 1]
    # discarded variance is the sum of the singular values each site dropped
    dropped = 0.0
    largest_dropped = 0.0
    for x in sites:
        s = linalg.svdvals(x - x.mean(axis=0))
        dropped += float(np.sum(s[7:] ** 2))
        largest_dropped += float(s[7] ** 2)
    # the bound's perturbation norm adds up every site's largest dropped squared value
    np.testing.assert_allclose(fed.summary_.discarded_norm, largest_dropped, rtol=1e-8)
    n = sum(x.shape[0] for x in sites)
    np.testing.assert_allclose(fed.discarded_variance_, dropped / (n - 1), rtol=1e-8)
    # the ratio is still relative to the exact total variance
    total_var = float(np.sum(np.var(np.vstack(sites), axis=0, ddof=1)))
    np.testing.assert_allclose(
        fed.explained_variance_ratio_, fed.explained_variance_ / total_var, rtol=1e-10
    )
    # a truncated fit reports the bound honestly when it is far from exact
    with pytest.warns(TruncationWarning):
        crude = FederatedPCA(k, site_rank=1).fit_sites(sites)
    assert subspace_error(crude.components_, ref.components_) <= crude.subspace_error_bound_


def test_site_rank_at_or_above_rank_is_exact_without_warning() -> None:
    sites = make_sites([20, 30], 12, seed=19)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)
        fed = FederatedPCA(4, site_rank=12).fit_sites(sites)
    assert not fed.truncated_
    assert_same_fit(fed, pooled(sites, 4))


def test_n_components_beyond_truncated_rank_is_refused() -> None:
    sites = make_sites([20, 30], 12, seed=19)
    with pytest.raises(ValueError, match="raise site_rank"):
        FederatedPCA(6, site_rank=2).fit_sites(sites)


# --------------------------------------------------------------------------- validation


def test_n_components_beyond_min_n_d_is_a_clear_error() -> None:
    sites = make_sites([3, 4], 20, seed=23)
    with pytest.raises(ValueError, match=r"min\(n_samples, n_features\)=min\(7, 20\)=7"):
        FederatedPCA(8).fit_sites(sites)
    FederatedPCA(7).fit_sites(sites)  # the limit itself is accepted


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.full((5, 6), np.nan), r"site 1 .*NaN"),
        (np.ones(6), r"site 1 .*2-D"),
        (np.ones((5, 7)), r"site 1 .*7 features but site 0 has 6"),
        (np.array([["a"] * 6] * 5), r"site 1 .*dtype"),
        (np.ones((0, 6)), r"site 1 .*at least one sample"),
    ],
)
def test_bad_site_data_names_the_site(bad: np.ndarray, match: str) -> None:
    good = np.random.default_rng(0).normal(size=(10, 6))
    with pytest.raises(SummaryError, match=match) as info:
        FederatedPCA(2).fit_sites([good, bad])
    assert info.value.site == 1


@pytest.mark.parametrize(
    "params",
    [{"n_components": 0}, {"n_components": 2.5}, {"site_rank": 0}, {"whiten": "yes"}],
)
def test_bad_parameters_are_refused_at_fit(params: dict[str, object]) -> None:
    x = np.random.default_rng(0).normal(size=(10, 4))
    est = FederatedPCA(2).set_params(**params)
    with pytest.raises(ValueError, match=next(iter(params))):
        est.fit(x)


def test_fit_sites_refuses_a_bare_array_and_too_few_samples() -> None:
    x = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match="list of 2-D arrays"):
        FederatedPCA(2).fit_sites(x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 samples"):
        FederatedPCA(1).fit_sites([x[:1]])


# --------------------------------------------------------------------------- messages


def test_summary_message_round_trip_and_bytes() -> None:
    (x,) = make_sites([30], 9, seed=29)
    s = local_summary(x, site_rank=4)
    msg = s.to_arrays()
    assert set(msg) == set(SUMMARY_KEYS)
    assert all(isinstance(v, np.ndarray) for v in msg.values())
    back = PCASummary.from_arrays(msg)
    assert back.n == 30 and back.n_features == 9 and back.rank == 4
    np.testing.assert_array_equal(back.block, s.block)
    np.testing.assert_array_equal(back.mean, s.mean)
    assert back.total_ss == s.total_ss and back.discarded_norm == s.discarded_norm > 0
    assert s.nbytes == sum(v.nbytes for v in msg.values()) == 8 * (4 * 9 + 9 + 3)
    assert s.nbytes < x.nbytes
    with pytest.raises(ValueError, match="read-only"):
        s.block[0, 0] = 1.0


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("block"), "missing"),
        (lambda m: m.update(extra=np.zeros(1)), "unexpected"),
        (lambda m: m.update(n=np.asarray(0)), "positive sample count"),
        (lambda m: m.update(n=np.asarray(2.5)), "integer"),
        (lambda m: m.update(block=np.zeros((2, 5))), "columns"),
        (lambda m: m.update(mean=np.full(9, np.inf)), "NaN or infinite"),
        (lambda m: m.update(total_ss=np.asarray(-1.0)), "non-negative"),
    ],
)
def test_malformed_message_is_rejected_naming_the_site(
    edit: Callable[[dict[str, np.ndarray]], object], match: str
) -> None:
    msg = site_pca_reply(np.random.default_rng(1).normal(size=(12, 9)))
    edit(msg)
    with pytest.raises(SummaryError, match=match) as info:
        PCASummary.from_arrays(msg, site="hospital_b")
    assert info.value.site == "hospital_b"
    assert "hospital_b" in str(info.value)


def test_server_merge_is_deterministic_and_exact() -> None:
    sites = make_sites([40, 25, 60], 16, seed=31)
    names = ["st_olav", "charite", "mayo"]
    replies = {name: site_pca_reply(x) for name, x in zip(names, sites, strict=True)}
    est = server_pca_merge(replies, 4)
    assert est.site_names_ == sorted(names)
    assert est.site_bytes_["mayo"] == local_summary(sites[2]).nbytes
    reversed_replies = dict(reversed(list(replies.items())))
    again = server_pca_merge(reversed_replies, 4)
    np.testing.assert_array_equal(again.components_, est.components_)
    np.testing.assert_array_equal(again.explained_variance_, est.explained_variance_)
    assert_same_fit(est, pooled(sites, 4))


def test_server_merge_rejects_a_bad_reply_with_invalid_reply() -> None:
    sites = make_sites([40, 25], 16, seed=37)
    replies = {"a": site_pca_reply(sites[0]), "b": site_pca_reply(sites[1][:, :10])}
    with pytest.raises(InvalidReply, match=r"'b'.*10 features") as info:
        server_pca_merge(replies, 3)
    assert info.value.site == "b"
    replies["b"] = {"n": np.asarray(3)}
    with pytest.raises(InvalidReply, match="missing"):
        server_pca_merge(replies, 3)


# --------------------------------------------------------------------------- scikit-learn contract


def test_clone_params_and_pickle_round_trip() -> None:
    sites = make_sites([50, 40], 10, seed=41)
    est = FederatedPCA(3, site_rank=None, whiten=True)
    assert est.get_params() == {
        "n_components": 3,
        "site_rank": None,
        "whiten": True,
        "svd_solver": "auto",
    }
    twin = clone(est).set_params(n_components=2)
    assert twin.n_components == 2 and est.n_components == 3
    assert not hasattr(twin, "components_")
    est.fit_sites(sites)
    restored = pickle.loads(pickle.dumps(est))
    x = np.vstack(sites)
    np.testing.assert_array_equal(restored.transform(x), est.transform(x))
    assert restored.summary_.n == est.summary_.n
    assert list(est.get_feature_names_out()) == ["federatedpca0", "federatedpca1", "federatedpca2"]


def test_transform_refuses_wrong_feature_count() -> None:
    est = FederatedPCA(2).fit_sites(make_sites([20, 20], 6, seed=43))
    with pytest.raises(ValueError, match="6 features"):
        est.transform(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="2 components"):
        est.inverse_transform(np.zeros((3, 3)))


def test_scikit_learn_check_estimator() -> None:
    results = check_estimator(FederatedPCA(), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])) for r in results if r["status"] == "failed"]
    assert failed == []


def test_reply_survives_flower_array_serialisation() -> None:
    flwr_app = pytest.importorskip("flwr.app")
    x = make_sites([30], 7, seed=47)[0]
    reply = site_pca_reply(x)
    record = flwr_app.ArrayRecord({k: flwr_app.Array(v) for k, v in reply.items()})
    back = {k: record[k].numpy() for k in record}
    est = server_pca_merge({"only": back}, 3)
    assert_same_fit(est, PCA(3, svd_solver="full").fit(x))


def test_accepts_float32_lists_and_dataframes() -> None:
    pd = pytest.importorskip("pandas")
    x = make_sites([40], 5, seed=53)[0]
    ref = FederatedPCA(2).fit_sites([x])
    from_lists = FederatedPCA(2).fit_sites([x[:25].tolist(), x[25:].astype(np.float32)])
    assert subspace_error(from_lists.components_, ref.components_) < 1e-6
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    est = FederatedPCA(2).fit(frame)
    assert list(est.feature_names_in_) == list(frame.columns)
    np.testing.assert_allclose(est.transform(frame), ref.transform(x), atol=1e-9)


def test_fit_sites_and_partial_fit_keep_dataframe_feature_names() -> None:
    """As fit(df) does: transform(df) then checks the names instead of warning."""
    pd = pytest.importorskip("pandas")
    cols = ["age", "bmi", "sbp", "crp"]
    df = pd.DataFrame(make_sites([30], 4, seed=61, signal=2)[0], columns=cols)
    sites = FederatedPCA(2).fit_sites([df.iloc[:20], df.iloc[20:]])
    incremental = FederatedPCA(2)
    incremental.partial_fit(df.iloc[:20])
    incremental.partial_fit(df.iloc[20:])
    for est in (sites, incremental):
        assert list(est.feature_names_in_) == cols
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            est.transform(df)
    # a site of plain arrays: no names (as fit(array)); refitting drops stale ones
    assert not hasattr(sites.fit_sites([df.iloc[:20], df.iloc[20:].to_numpy()]),
                       "feature_names_in_")
    reordered = df.iloc[20:][cols[::-1]]
    with pytest.raises(SummaryError, match=r"site 1.*columns \['crp', 'sbp', 'bmi', 'age'\] "
                       r"differ from site 0's.*another order"):
        FederatedPCA(2).fit_sites([df.iloc[:20], reordered])
    renamed = df.iloc[20:].rename(columns={"crp": "ldh"})
    with pytest.raises(SummaryError, match="differ from site 0's"):
        FederatedPCA(2).fit_sites([df.iloc[:20], renamed])
    with pytest.raises(ValueError, match="feature names"):
        incremental.partial_fit(renamed)


def test_default_n_components_keeps_what_truncated_summaries_carry() -> None:
    sites = make_sites([30, 40], 12, seed=59)
    with pytest.warns(TruncationWarning):
        est = FederatedPCA(site_rank=3).fit_sites(sites)
    assert est.n_components_ == 3 + 3 + 1  # two blocks of 3 rows and one correction row
    assert FederatedPCA().fit_sites(sites).n_components_ == 12


@pytest.mark.parametrize("svd_solver", SVD_SOLVERS)
def test_overflowing_data_is_a_clear_error(svd_solver: str) -> None:
    x = np.random.default_rng(67).normal(size=(10, 3)) * 1e200
    with pytest.raises(SummaryError, match=r"site 'charite'.*overflows float64.*rescale"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            local_summary(x, svd_solver=svd_solver, site="charite")
