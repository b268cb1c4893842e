"""Secure sum: the total is exact, each masked vector tells nothing, dropouts and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from multimodal_fl.federated.secure_sum import (
    SecureSumError,
    SecureSumServer,
    SecureSumSite,
    secure_sum,
    threshold,
)

RNG = np.random.default_rng(7)


def _vectors(n_sites: int, size: int = 50, high: int = 1000) -> dict[str, np.ndarray]:
    return {f"site_{i}": RNG.integers(0, high, size) for i in range(n_sites)}


@pytest.mark.parametrize("n_sites", [3, 4, 6])
def test_the_total_is_exact(n_sites: int) -> None:
    vectors = _vectors(n_sites)
    np.testing.assert_array_equal(secure_sum(vectors), sum(vectors.values()))


def test_two_sites_are_refused_with_the_reason() -> None:
    with pytest.raises(SecureSumError, match=r"at least 3 sites.*subtracting its own"):
        secure_sum(_vectors(2))


def test_a_site_dropping_after_key_sharing_does_not_stop_the_sum() -> None:
    vectors = _vectors(5)
    total = secure_sum(vectors, drop_after_sharing=["site_2"])
    expected = sum(v for k, v in vectors.items() if k != "site_2")
    np.testing.assert_array_equal(total, expected)


def test_too_many_dropouts_fail_with_the_count() -> None:
    assert threshold(5) == 3
    with pytest.raises(SecureSumError, match=r"2 site\(s\) sent their shares, 3 are needed"):
        secure_sum(_vectors(5), drop_after_sharing=["site_0", "site_1", "site_2"])


def test_no_masked_vector_correlates_with_its_site_vector() -> None:
    """What the server receives from one site is uniform noise to it (|corr| < 0.05)."""
    bits = 40
    vectors = {f"s{i}": RNG.integers(0, 2**20, 20_000) for i in range(3)}
    sites = {n: SecureSumSite(n, bits) for n in vectors}
    server = SecureSumServer(bits)
    keys = server.collect_keys({n: s.advertise() for n, s in sites.items()})
    routed = server.route({n: s.share(keys) for n, s in sites.items()})
    masked = {n: s.masked(routed[n], vectors[n]) for n, s in sites.items()}
    for name, y in masked.items():
        corr = np.corrcoef(y.astype(float), vectors[name].astype(float))[0, 1]
        assert abs(corr) < 0.05, (name, corr)
        assert y.max() > 2 ** (bits - 2)  # spread over the whole modulus, not near the data
    shares = {n: s.unmask(sorted(masked), []) for n, s in sites.items()}
    np.testing.assert_array_equal(server.total(masked, shares, sorted(sites)),
                                  sum(vectors.values()))


def test_shares_are_unreadable_to_the_server_and_a_site_never_reveals_both_secrets() -> None:
    sites = {n: SecureSumSite(n) for n in ("a", "b", "c")}
    server = SecureSumServer()
    keys = server.collect_keys({n: s.advertise() for n, s in sites.items()})
    shares = {n: s.share(keys) for n, s in sites.items()}
    seed_of_a = sites["a"]._seed  # the secret a share must not show in the clear
    assert all(seed_of_a not in c for per in shares.values() for c in per.values())
    routed = server.route(shares)
    for n, s in sites.items():
        s.masked(routed[n], np.arange(4))
    with pytest.raises(SecureSumError, match="refuses to reveal both secrets"):
        sites["b"].unmask(["a"], ["a"])


@pytest.mark.parametrize("bad", [np.array([-1, 2]), np.array([0.5, 1.0]), np.ones((2, 2), int)])
def test_bad_vectors_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(SecureSumError, match="site site_0"):
        secure_sum({"site_0": bad, "site_1": np.zeros(2, int), "site_2": np.zeros(2, int)})
