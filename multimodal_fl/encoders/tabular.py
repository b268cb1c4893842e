"""Tabular encoder: standardisation (pooled or federated statistics), missingness indicators, MLP.

Missing values are ``NaN`` in the input. After standardisation they are imputed with 0
(the feature mean) and a 0/1 indicator per feature is concatenated, so the network can
tell "missing" from "average". An optional linear ("wide") path gives a linear logit of the
same prepared input, which the fusion model adds to its own logit (wide and deep), so a
logistic regression on the standardised features lies inside the model class.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from multimodal_fl.encoders._common import section_to_kwargs
from multimodal_fl.moments import Moments, column_moments, pool_moments, standardization

__all__ = ["Moments", "Standardizer", "TabularEncoder", "combine_moments"]


def _as_2d_float(x: Any, where: str) -> np.ndarray:
    arr = np.asarray(
        x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64
    )
    if arr.ndim != 2:
        raise ValueError(
            f"{where}: expected a 2-D array [samples, features], got shape {arr.shape}"
        )
    if np.isinf(arr).any():
        raise ValueError(f"{where}: infinite values found; use NaN for missing values")
    return arr


def combine_moments(moments: Iterable[Moments]) -> Moments:
    """Sum per-site moments into consortium moments (:func:`multimodal_fl.moments.pool_moments`).

    Parameters
    ----------
    moments : iterable of (n, sum, sumsq)
        One triple per site, as returned by :meth:`Standardizer.site_moments`.

    Returns
    -------
    (n, sum, sumsq)
        Element-wise sums.
    """
    return pool_moments(moments)


class Standardizer(nn.Module):
    """Per-feature standardisation ``(x - mean) / scale`` with statistics stored as buffers.

    Statistics come from pooled data (:meth:`fit`) or from federated sums
    (:meth:`from_moments` over the per-site :meth:`site_moments`); both give the same
    result on the same rows (population variance, ``ddof=0``, over observed values only).
    A feature never observed gets mean 0 and scale 1; a constant feature gets scale 1.

    Parameters
    ----------
    n_features : int
        Number of features.

    Attributes
    ----------
    mean, scale, count : Tensor[F] buffers
        In the module's ``state_dict`` (so they travel with the weights).
    """

    mean: torch.Tensor
    scale: torch.Tensor
    count: torch.Tensor

    def __init__(self, n_features: int) -> None:
        super().__init__()
        if int(n_features) < 1:
            raise ValueError(f"n_features must be at least 1, got {n_features!r}")
        self.n_features = int(n_features)
        self.register_buffer("mean", torch.zeros(self.n_features, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(self.n_features, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(self.n_features, dtype=torch.float64))

    @staticmethod
    def site_moments(X: Any) -> Moments:
        """Per-feature count of observed values, sum and sum of squares of one site's rows.

        Parameters
        ----------
        X : array-like [n_samples, n_features]
            ``NaN`` marks a missing value (not counted).

        Returns
        -------
        (n, sum, sumsq) : tuple of numpy.ndarray [F]
            What a site sends for federated standardisation (aggregate, no rows):
            :func:`multimodal_fl.moments.column_moments`.
        """
        return column_moments(_as_2d_float(X, "Standardizer.site_moments"),
                              where="Standardizer.site_moments")

    def set_moments(self, n: Any, sums: Any, sumsq: Any) -> Standardizer:
        """Set mean and scale from (summed) moments; returns ``self``."""
        n_, s_, q_ = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (n, sums, sumsq))
        if not (n_.shape == s_.shape == q_.shape == (self.n_features,)):
            raise ValueError(
                f"moments must each have {self.n_features} entries, got shapes "
                f"{n_.shape}, {s_.shape}, {q_.shape}"
            )
        mean, scale = standardization(n_, s_, q_)
        self.mean.copy_(torch.from_numpy(mean))
        self.scale.copy_(torch.from_numpy(scale))
        self.count.copy_(torch.from_numpy(n_))
        return self

    @classmethod
    def from_moments(cls, n: Any, sums: Any, sumsq: Any) -> Standardizer:
        """Build from consortium moments (sum of every site's :meth:`site_moments`).

        Parameters
        ----------
        n, sums, sumsq : array-like [F]
            Per-feature observed counts, sums and sums of squares.

        Returns
        -------
        Standardizer
        """
        n_arr = np.asarray(n, dtype=np.float64).reshape(-1)
        return cls(n_arr.shape[0]).set_moments(n_arr, sums, sumsq)

    def fit(self, X: Any) -> Standardizer:
        """Fit on pooled rows (``NaN`` = missing); returns ``self``."""
        arr = _as_2d_float(X, "Standardizer.fit")
        if arr.shape[1] != self.n_features:
            raise ValueError(
                f"Standardizer.fit: expected {self.n_features} features, got {arr.shape[1]}"
            )
        return self.set_moments(*self.site_moments(arr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise ``Tensor[B, F]`` (NaN stays NaN)."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(
                f"Standardizer expects Tensor[B, {self.n_features}], got shape {tuple(x.shape)}"
            )
        return ((x - self.mean.to(x.dtype)) / self.scale.to(x.dtype)).to(x.dtype)


class TabularEncoder(nn.Module):
    """MLP over standardised features and their missingness indicators.

    ``forward(x: Tensor[B, F]) -> Tensor[B, output_dim]``; ``NaN`` marks missing values.
    With ``linear_path=True`` the encoder also has a linear logit ``linear(z)`` of the
    prepared input ``z`` (:meth:`prepare`), :meth:`linear_logit`, which
    :class:`~multimodal_fl.fusion.FusionModel` adds to its logit for the patients with
    tabular data: wide and deep. It is any linear model of the standardised, mean-imputed
    features and their indicators, e.g. a logistic regression's logit; it starts at zero,
    so training starts from the model without the path.

    Parameters
    ----------
    n_features : int
        Number of input features ``F``.
    hidden : sequence of int, default (64,)
        Hidden layer widths (Linear -> ReLU -> Dropout each).
    embed_dim : int or None, default None
        Output size of a final linear layer; ``None`` means ``output_dim = hidden[-1]``.
    dropout : float, default 0.1
        Dropout after each hidden layer.
    missing_indicators : bool, default True
        Concatenate a 0/1 "was missing" indicator per feature.
    feature_names : sequence of str or None
        Names for error messages and documentation (not part of the state dict).
    linear_path : bool, default False
        Give a linear logit of the prepared input (parameters ``linear.weight`` [1, F or
        2F] and ``linear.bias`` [1], initialised to zero).
    linear_lr_scale : float, default 1.0
        The linear path's learning rate as a multiple of the optimiser's (read by
        :meth:`~multimodal_fl.fusion.FusionModel.optimizer_param_groups`; not part of the
        state dict).

    Attributes
    ----------
    standardizer : Standardizer
        Set it with ``encoder.standardizer.fit(X)`` or ``.set_moments(n, s, q)``.
    linear : torch.nn.Linear or None
        The linear path (``None`` without it); ``forward`` does not use it.
    linear_lr_scale : float
        As the parameter.
    output_dim : int

    Examples
    --------
    >>> import torch
    >>> enc = TabularEncoder(3, hidden=[8])
    >>> enc(torch.tensor([[1.0, float("nan"), 2.0]])).shape
    torch.Size([1, 8])
    """

    def __init__(
        self,
        n_features: int,
        *,
        hidden: Sequence[int] = (64,),
        embed_dim: int | None = None,
        dropout: float = 0.1,
        missing_indicators: bool = True,
        feature_names: Sequence[str] | None = None,
        linear_path: bool = False,
        linear_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.n_features = int(n_features)
        if self.n_features < 1:
            raise ValueError(f"n_features must be at least 1, got {n_features!r}")
        widths = [int(h) for h in hidden]
        if any(w < 1 for w in widths) or (not widths and embed_dim is None):
            raise ValueError(
                f"hidden must be positive widths (got {list(hidden)!r}); with no hidden layer "
                "give embed_dim"
            )
        if feature_names is not None and len(feature_names) != self.n_features:
            raise ValueError(
                f"feature_names has {len(feature_names)} names for {self.n_features} features"
            )
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.linear_lr_scale = float(linear_lr_scale)
        if not self.linear_lr_scale > 0:
            raise ValueError(f"linear_lr_scale must be positive, got {linear_lr_scale!r}")
        self.missing_indicators = bool(missing_indicators)
        self.standardizer = Standardizer(self.n_features)
        layers: list[nn.Module] = []
        width = self.n_features * (2 if self.missing_indicators else 1)
        for w in widths:
            layers += [nn.Linear(width, w), nn.ReLU(), nn.Dropout(dropout)]
            width = w
        if embed_dim is not None:
            layers.append(nn.Linear(width, int(embed_dim)))
            width = int(embed_dim)
        self.mlp = nn.Sequential(*layers)
        self.output_dim = width
        self.linear: nn.Linear | None = None
        if linear_path:
            # zero, and drawn from no RNG: every other initial weight stays as without it;
            # on the default device like the MLP (skip_init's own default is the CPU)
            self.linear = nn.utils.skip_init(
                nn.Linear, self.n_features * (2 if self.missing_indicators else 1), 1,
                device=torch.get_default_device(),
            )
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    @classmethod
    def from_config(cls, section: Any, *, n_features: int, **kwargs: Any) -> TabularEncoder:
        """Build from a config section such as ``{encoder: mlp, hidden: [64]}``.

        ``n_features`` comes from the cohort, not the config.
        """
        data = section_to_kwargs(
            section,
            accepted=("encoder", "hidden", "embed_dim", "dropout", "missing_indicators",
                      "linear_path", "linear_lr_scale"),
            ignored=("frozen", "cache", "enabled"),
            where="modalities.tabular",
        )
        name = data.pop("encoder", "mlp")
        if name != "mlp":
            raise ValueError(
                f"modalities.tabular.encoder: unknown encoder {name!r}; accepted: ['mlp']"
            )
        data.update(kwargs)
        return cls(n_features, **data)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise, impute missing with 0 and append indicators: ``Tensor[B, F or 2F]``.

        Standardises in the wider of ``x``'s and the parameters' floating dtypes (the
        float64 statistics cast to it: float32 input to a float32 model is standardised in
        float32, float64 input or a ``.double()`` model in float64), then casts to the
        parameters' dtype, so ``.double()`` and a float64 default dtype work.
        """
        dtype = next(self.mlp.parameters()).dtype
        work = torch.promote_types(x.dtype, dtype) if x.is_floating_point() else dtype
        z = self.standardizer(x.to(work))
        missing = torch.isnan(z)
        z = torch.where(missing, torch.zeros_like(z), z)
        if self.missing_indicators:
            z = torch.cat([z, missing.to(z.dtype)], dim=1)
        return z.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``Tensor[B, n_features]`` (NaN = missing) to ``Tensor[B, output_dim]``."""
        self._check(x)
        out: torch.Tensor = self.mlp(self.prepare(x))
        return out

    def linear_logit(self, x: torch.Tensor) -> torch.Tensor | None:
        """The linear path's logit of raw features: ``Tensor[B]``; ``None`` without the path.

        Parameters
        ----------
        x : Tensor[B, n_features]
            Raw features, ``NaN`` for missing.

        Returns
        -------
        Tensor[B] or None
        """
        if self.linear is None:
            return None
        self._check(x)
        out: torch.Tensor = self.linear(self.prepare(x)).squeeze(1)
        return out

    def _check(self, x: torch.Tensor) -> None:
        """Raise a one-line error unless ``x`` is ``Tensor[B, n_features]`` without infinities."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(
                f"TabularEncoder expects Tensor[B, {self.n_features}] (NaN for missing), "
                f"got shape {tuple(x.shape)}"
            )
        if torch.isinf(x).any():
            raise ValueError("TabularEncoder: infinite input values; use NaN for missing values")
