"""Site-level differential privacy of the aggregate: clip each site's update, noise their sum.

The server-side fixed-clipping mechanism of McMahan et al. (2018, "Learning differentially
private recurrent language models"), the one Flower's ``DifferentialPrivacyServerSideFixedClipping``
wraps around a strategy, written here as pure functions over state dicts for the package's own
server loop. With ``w`` the global weights of the round, ``w_k`` site ``k``'s reply and ``K``
the number of sites aggregated:

1. each site's update ``u_k = w_k - w`` over every floating-point key (FedBN's local keys and
   integer buffers left out; a parameter group the site did not train counts 0) is clipped to
   L2 norm ``S``: ``u_k * min(1, S / ||u_k||)``; keys no site changed (the tabular
   standardiser's moments; a group no site trained) keep their value and take no noise;
2. the clipped updates are summed and Gaussian noise ``N(0, (z S)^2)`` is added to every
   coordinate of the sum; the sum has sensitivity ``S`` to adding or removing one site, so this
   is the Gaussian mechanism with noise multiplier ``z``;
3. the new global weights are ``w + (sum + noise) / K`` (dividing by ``K``, taken as public,
   is post-processing). Flower's helper draws the same noise as ``z S / K`` on the mean.

With secure aggregation (:mod:`~multimodal_fl.federated.secure_update`) the server never sees
``u_k``: each site clips its own update to ``S`` before masking (Flower's
``DifferentialPrivacyClientSideFixedClipping`` with its ``fixedclipping_mod``), and the server
applies step 2 and 3 to the unmasked sum alone (:func:`noisy_mean`), the same noise on the same
sum.

The sites' updates are averaged with equal weight, not by sample counts: a weighted mean
would give one site a sensitivity of its weight times ``S``. Composing the rounds (Opacus' RDP
accountant, sampling rate 1: every site the loop draws is asked, and the draw is no secret)
gives an epsilon for the participation of one whole hospital (all its patients at once), not
for one patient: that is what DP-SGD at each site protects
(:mod:`multimodal_fl.training.privacy`). The noise comes from the operating system's CSPRNG
(:mod:`secrets`-seeded numpy generator), never from the run seed.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from multimodal_fl.federated.aggregation import group_of
from multimodal_fl.federated.protocol import Reply, StateDict

__all__ = ["SiteLevelDP", "clip_update", "noisy_mean", "private_mean", "site_update"]


@dataclass(frozen=True)
class SiteLevelDP:
    """The server's site-level DP settings.

    Parameters
    ----------
    clip_norm : float
        ``S``: each site's update is clipped to this L2 norm.
    noise_multiplier : float
        ``z``: the noise on the sum has standard deviation ``z * S``; 0 clips without noise
        (no privacy: for tests and for measuring what clipping alone costs, as Flower allows;
        the experiment config asks for ``z > 0``).
    """

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        """Check the settings."""
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"site-level DP clip_norm={self.clip_norm}: expected a finite "
                             "number > 0")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"site-level DP noise_multiplier={self.noise_multiplier}: expected "
                             "a finite number >= 0")


def _is_float(a: np.ndarray) -> bool:
    return bool(np.issubdtype(np.asarray(a).dtype, np.floating))


def site_update(reply: Reply, global_weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A site's update ``w_k - w`` over the floating-point keys it may change (float64).

    Parameters
    ----------
    reply : Reply
        A checked fit reply.
    global_weights : mapping
        The round's global weights.

    Returns
    -------
    dict of str to ndarray
        Every floating-point key of ``global_weights`` but the reply's local keys; 0 where the
        site's group count is 0 or the key is missing from its reply.
    """
    local = set(reply.local_keys)
    out: dict[str, np.ndarray] = {}
    for key, value in global_weights.items():
        if key in local or not _is_float(value):
            continue
        group = group_of(key, reply.group_counts)
        count = reply.n_samples if group is None else reply.group_counts[group]
        if count > 0 and key in reply.weights:
            out[key] = np.asarray(reply.weights[key], np.float64) - np.asarray(value, np.float64)
        else:
            out[key] = np.zeros(np.shape(value), np.float64)
    return out


def clip_update(update: Mapping[str, np.ndarray], clip_norm: float
                ) -> tuple[dict[str, np.ndarray], float]:
    """``update`` scaled to L2 norm at most ``clip_norm`` (over all its arrays together).

    Parameters
    ----------
    update : mapping of str to ndarray
    clip_norm : float

    Returns
    -------
    clipped : dict of str to ndarray
    norm : float
        The norm before clipping.
    """
    norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in update.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, norm


def private_mean(
    replies: Sequence[Reply], global_weights: Mapping[str, np.ndarray], dp: SiteLevelDP, *,
    rng: np.random.Generator | None = None,
) -> tuple[StateDict, dict[str, Any]]:
    """The new global floating-point weights: ``w + (sum of clipped updates + noise) / K``.

    Parameters
    ----------
    replies : sequence of Reply
        The round's checked fit replies (summed in sorted site order).
    global_weights : mapping
        The round's global weights.
    dp : SiteLevelDP
    rng : numpy.random.Generator or None
        The noise source (default: seeded from the OS's CSPRNG; give one only in tests).

    Returns
    -------
    weights : dict of str to ndarray
        The keys of :func:`site_update` that at least one site changed, in their global
        dtypes (every other key keeps its global value).
    info : dict
        ``clipped`` (sites whose update was scaled down), ``noise_std`` (on the mean) and
        ``sites`` (``K``): what the round record keeps.
    """
    if not replies:
        raise ValueError("private_mean: no replies to aggregate")
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    ordered = sorted(replies, key=lambda r: r.site)
    updates = [site_update(reply, global_weights) for reply in ordered]
    # keys no site changed (buffers training leaves alone, groups no site trained) keep their
    # value: which keys change is fixed by the model and the sites' modalities, not a patient
    changed = sorted({k for u in updates for k, v in u.items() if np.any(v != 0)})
    total = {k: np.zeros(np.shape(global_weights[k]), np.float64) for k in changed}
    clipped: list[str] = []
    for reply, update in zip(ordered, updates, strict=True):
        scaled, norm = clip_update({k: update[k] for k in changed}, dp.clip_norm)
        if norm > dp.clip_norm:
            clipped.append(reply.site)
        for key, value in scaled.items():
            total[key] += value
    out, info = noisy_mean(total, global_weights, dp, len(ordered), rng=rng)
    return out, {"clipped": clipped, **info}


def noisy_mean(
    total: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray], dp: SiteLevelDP,
    n_sites: int, *, rng: np.random.Generator | None = None,
) -> tuple[StateDict, dict[str, Any]]:
    """The new weights from the sum of ``n_sites`` clipped updates: ``w + (sum + noise) / K``.

    Gaussian noise ``N(0, (z S)^2)`` is drawn for every coordinate of ``total``, key by key in
    sorted order, from the OS's CSPRNG unless ``rng`` is given.

    Parameters
    ----------
    total : mapping of str to ndarray
        The sum of the sites' clipped updates per key (only the keys some site changed: the
        others keep their value and take no noise).
    global_weights : mapping
        The round's global weights (the dtypes of the result).
    dp : SiteLevelDP
    n_sites : int
        ``K``, the number of sites summed (equal weights).
    rng : numpy.random.Generator or None
        The noise source (give one only in tests).

    Returns
    -------
    weights : dict of str to ndarray
        The keys of ``total`` in their global dtypes.
    info : dict
        ``noise_std`` (the noise's standard deviation on the mean, ``z S / K``) and ``sites``
        (``K``).
    """
    if n_sites < 1:
        raise ValueError(f"noisy_mean: {n_sites} sites summed; expected at least 1")
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    std = dp.noise_multiplier * dp.clip_norm
    out: StateDict = {}
    for key in sorted(total):
        summed = np.asarray(total[key], np.float64)
        noisy = summed + rng.normal(0.0, std, size=summed.shape)
        base = np.asarray(global_weights[key])
        out[key] = (base.astype(np.float64) + noisy.reshape(base.shape) / n_sites
                    ).astype(base.dtype)
    return out, {"noise_std": std / n_sites, "sites": n_sites}
