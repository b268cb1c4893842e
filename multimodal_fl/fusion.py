"""Fusion model: per-modality encoders -> projection to a common width -> fusion -> one logit.

A patient may have any non-empty subset of the modalities (``image``, ``tabular``, ``text``).
The model takes a dict of per-modality input tensors (one row per patient, rows of absent
modalities are ignored and may hold anything finite, e.g. zeros) and a boolean presence mask
``Tensor[B, M]`` whose columns follow :attr:`FusionModel.modalities`.

Fusion kinds
------------
``concat``
    Projected embeddings, zeroed where the modality is absent, concatenated with the presence
    mask, then an MLP (``fusion.``) and a linear head (``head.``).
``attention``
    One token per modality (projection + learned modality-type embedding) after a learned CLS
    token; a Transformer encoder layer attends with a key-padding mask that hides absent
    modalities; the head reads the CLS token.
``late``
    One logit head per modality (``head.<modality>.``); the patient's logit is the mean of the
    logits of the modalities present.

Wide and deep: an encoder with a linear path (the tabular encoder with ``linear_path``) adds
its linear logit to the fused logit of every patient who has its modality
(:meth:`FusionModel.linear_logits`), whatever the kind, so a logistic regression on the
standardised features lies inside the model class (the fused part at a constant).

Parameter groups
----------------
Parameter names start with ``encoders.<modality>.``, ``proj.<modality>.``, ``fusion.`` or
``head.`` (``head.<modality>.`` for late fusion). :meth:`FusionModel.parameter_groups` maps
each prefix to its modality (``None`` for the shared parts), so a federated server can
average a modality's parameters over the sites that trained it, without knowing what a
modality is.

Missing inputs never reach an encoder: each encoder runs only on the rows where its modality
is present (and not at all when no row has it), so BatchNorm statistics never see filler
rows and the parameters of a modality absent from a whole batch get no gradient (AdamW then
leaves them untouched).

Dense mode (``dense=True``, the model of differentially private training): every encoder
and projection runs on every row of the batch and a row's projected embedding is multiplied
by its presence (0 where the modality is absent); late fusion runs every head on every batch.
Each parameter then sees one activation row per patient, which per-sample gradients (Opacus'
hooks) need, and an absent modality's per-sample gradient is exactly 0. Filler rows must be
finite (they are: zeros); the model must have no BatchNorm then (DP-SGD's models use
GroupNorm, :func:`multimodal_fl.training.privacy.make_private_compatible`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FUSION_KINDS", "MODALITIES", "FusionModel", "NoModalityError", "modality_dropout"]

#: Modality names, in the canonical column order of presence masks.
MODALITIES: tuple[str, ...] = ("image", "tabular", "text")
#: Accepted ``kind`` values.
FUSION_KINDS: tuple[str, ...] = ("concat", "attention", "late")


class NoModalityError(ValueError):
    """Some patients have no modality present; the message and ``patient_ids`` name them."""

    def __init__(self, patient_ids: Sequence[str]) -> None:
        self.patient_ids = list(patient_ids)
        shown = ", ".join(self.patient_ids[:20])
        more = f" and {len(self.patient_ids) - 20} more" if len(self.patient_ids) > 20 else ""
        super().__init__(
            f"{len(self.patient_ids)} patient(s) have no modality present (no usable image, "
            f"tabular feature or note), so no prediction can be made: {shown}{more}. "
            "Drop them from the cohort or enable a modality they have."
        )


def modality_dropout(
    mask: torch.Tensor, p: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Randomly hide present modalities, never all of a patient's.

    Each present modality is dropped independently with probability ``p``; a patient who
    would lose every present modality keeps one of them, chosen uniformly at random.

    Parameters
    ----------
    mask : Tensor[B, M] of bool
        Presence mask.
    p : float
        Drop probability in ``[0, 1)``.
    generator : torch.Generator or None
        Random source; ``None`` uses torch's default generator.

    Returns
    -------
    Tensor[B, M] of bool
        A mask with a subset of the present entries, at least one per row that had one.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"modality dropout probability must be in [0, 1), got {p!r}")
    if p == 0.0:
        return mask
    drop = torch.rand(mask.shape, generator=generator, device=mask.device) < p
    kept = mask & ~drop
    lost_all = mask.any(1) & ~kept.any(1)
    if lost_all.any():
        # pick one present modality per such row: the present entry with the largest random key
        keys = torch.rand(mask.shape, generator=generator, device=mask.device)
        keys = torch.where(mask, keys, torch.full_like(keys, -1.0))
        choice = nn.functional.one_hot(keys.argmax(1), mask.shape[1]).bool()
        kept = torch.where(lost_all[:, None], choice & mask, kept)
    return kept


class FusionModel(nn.Module):
    """Multimodal classifier over any non-empty subset of modalities.

    Parameters
    ----------
    encoders : mapping of str to nn.Module or int
        One entry per modality the model uses (keys from :data:`MODALITIES`, any order; the
        model orders them canonically). A module (with an ``output_dim`` attribute) encodes
        the raw input of that modality, a tensor (e.g. an image batch); an int says the
        input is a precomputed embedding of that width (a frozen encoder through the
        embedding cache), encoded by the identity. A module whose ``input_is_tensor``
        attribute is False (``TextEncoder``: it takes lists of notes) is refused: pass its
        precomputed embeddings and their width (``encoder.output_dim``) instead.
    kind : {"concat", "attention", "late"}, default "concat"
        Fusion kind (see the module docstring).
    dim : int, default 64
        Common width every modality is projected to.
    heads : int, default 4
        Attention heads (``kind="attention"``); ``dim`` must be divisible by it.
    modality_dropout : float, default 0.0
        Training-time probability of hiding each present modality (never all of them).
    dropout : float, default 0.1
        Dropout in the projections and the fusion layers.
    dense : bool, default False
        Run every encoder on every row and zero absent rows after the projection (see the
        module docstring): the form per-sample gradients need.

    Attributes
    ----------
    modalities : tuple of str
        The modalities used, in canonical order: the column order of the presence mask.
    input_dims : dict of str to int
        Width of each modality's encoder output (the projection's input).

    Examples
    --------
    >>> import torch
    >>> model = FusionModel({"tabular": 5, "text": 8}, kind="attention", dim=16, heads=2)
    >>> x = {"tabular": torch.zeros(3, 5), "text": torch.zeros(3, 8)}
    >>> mask = torch.tensor([[True, True], [True, False], [False, True]])
    >>> model(x, mask).shape
    torch.Size([3])
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module | int],
        *,
        kind: str = "concat",
        dim: int = 64,
        heads: int = 4,
        modality_dropout: float = 0.0,
        dropout: float = 0.1,
        dense: bool = False,
    ) -> None:
        super().__init__()
        self.dense = bool(dense)
        unknown = sorted(set(encoders) - set(MODALITIES))
        if unknown:
            raise ValueError(f"unknown modality {unknown}; accepted: {list(MODALITIES)}")
        if not encoders:
            raise ValueError(f"FusionModel needs at least one modality of {list(MODALITIES)}")
        if kind not in FUSION_KINDS:
            raise ValueError(f"fusion kind {kind!r} is not one of {list(FUSION_KINDS)}")
        if int(dim) < 1:
            raise ValueError(f"fusion dim must be a positive integer, got {dim!r}")
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout!r}")
        if kind == "attention" and (int(heads) < 1 or int(dim) % int(heads) != 0):
            raise ValueError(
                f"fusion.dim={dim} must be divisible by fusion.heads={heads} for attention "
                "fusion; change either"
            )
        self.kind = kind
        self.dim = int(dim)
        self.heads = int(heads)
        self.modality_dropout = float(modality_dropout)
        self.modalities: tuple[str, ...] = tuple(m for m in MODALITIES if m in encoders)
        self.input_dims: dict[str, int] = {}
        self.encoders = nn.ModuleDict()
        self.precomputed: tuple[str, ...] = tuple(
            m for m in self.modalities if not isinstance(encoders[m], nn.Module)
        )
        for m in self.modalities:
            enc = encoders[m]
            if isinstance(enc, nn.Module):
                width = getattr(enc, "output_dim", None)
                if not isinstance(width, int) or width < 1:
                    raise ValueError(
                        f"encoder for {m!r} ({type(enc).__name__}) needs an integer "
                        f"'output_dim' attribute, got {width!r}"
                    )
                if not getattr(enc, "input_is_tensor", True):
                    raise ValueError(
                        f"encoder for {m!r} ({type(enc).__name__}) does not take a tensor, "
                        f"which FusionModel passes it; embed the inputs first and pass the "
                        f"embeddings' width instead: {{{m!r}: {width}}}"
                    )
                self.encoders[m] = enc
            else:
                width = int(enc)
                if width < 1:
                    raise ValueError(f"embedding width for {m!r} must be positive, got {enc!r}")
                self.encoders[m] = nn.Identity()
            self.input_dims[m] = width
        self.proj = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.Linear(self.input_dims[m], self.dim),
                    nn.LayerNorm(self.dim),
                    nn.ReLU(),
                    nn.Dropout(dropout),
                )
                for m in self.modalities
            }
        )
        n_mod = len(self.modalities)
        self.fusion: nn.Module
        self.head: nn.Module
        if kind == "concat":
            self.fusion = nn.Sequential(
                nn.Linear(n_mod * self.dim + n_mod, self.dim), nn.ReLU(), nn.Dropout(dropout)
            )
            self.head = nn.Linear(self.dim, 1)
        elif kind == "attention":
            self.fusion = _AttentionFusion(n_mod, self.dim, self.heads, dropout)
            self.head = nn.Linear(self.dim, 1)
        else:
            self.fusion = nn.Identity()
            self.head = nn.ModuleDict({m: nn.Linear(self.dim, 1) for m in self.modalities})

    # ------------------------------------------------------------------ groups

    def parameter_groups(self) -> dict[str, str | None]:
        """Map each parameter-name prefix to its modality (``None``: shared by all).

        Returns
        -------
        dict of str to str or None
            ``{"encoders.image.": "image", "proj.image.": "image", ..., "fusion.": None,
            "head.": None}``; late fusion adds ``"head.<modality>.": <modality>`` (the
            longest matching prefix wins). Only prefixes of modalities in the model appear.
        """
        groups: dict[str, str | None] = {}
        for m in self.modalities:
            groups[f"encoders.{m}."] = m
            groups[f"proj.{m}."] = m
            if self.kind == "late":
                groups[f"head.{m}."] = m
        groups["fusion."] = None
        groups["head."] = None
        return groups

    def linear_path_groups(self, lr: float) -> list[dict[str, Any]]:
        """The trainable parameters of the encoders' linear paths, a group per encoder.

        An encoder has a path when it has a ``linear`` module (the tabular encoder with
        ``linear_path``); its group's learning rate is ``lr`` times its ``linear_lr_scale``
        (default 1).

        Parameters
        ----------
        lr : float
            The base learning rate each encoder's scale multiplies.

        Returns
        -------
        list of dict
            ``[{"params": [...], "lr": lr * scale}, ...]`` (encoders whose path has no
            trainable parameter left out; empty: no path).
        """
        groups: list[dict[str, Any]] = []
        for _, enc, linear in self.path_encoders():
            params = [p for p in linear.parameters() if p.requires_grad]
            if params:
                scale = float(getattr(enc, "linear_lr_scale", 1.0))
                groups.append({"params": params, "lr": lr * scale})
        return groups

    def path_encoders(self) -> list[tuple[int, nn.Module, nn.Module]]:
        """The encoders with a linear path (a ``linear`` module), in :attr:`modalities` order.

        Returns
        -------
        list of (int, nn.Module, nn.Module)
            The modality's column (in :attr:`modalities` and a batch's ``mask``), the
            encoder, and its ``linear`` module.
        """
        out = []
        for j, m in enumerate(self.modalities):
            linear = getattr(self.encoders[m], "linear", None) if m in self.encoders else None
            if isinstance(linear, nn.Module):
                out.append((j, self.encoders[m], linear))
        return out

    def linear_path_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the encoders' linear paths (empty: no path).

        Returns
        -------
        list of nn.Parameter
            Those :meth:`optimizer_param_groups` puts at ``lr * linear_lr_scale``.
        """
        return [p for g in self.linear_path_groups(1.0) for p in g["params"]]

    def zero_head_weights(self, *, bias: bool = False) -> None:
        """Set the weights of the fused head(s) to zero (biases kept unless ``bias``), in place.

        The deep part's logit is then a constant until training moves the head, so a model
        with a linear path starts as that path alone (``training.linear_warmup_steps``); with
        ``bias`` that constant is 0 (``training.linear_warmup_fit``: the path's own bias is the
        fitted regression's intercept).

        Parameters
        ----------
        bias : bool, default False
            Zero the heads' biases too.
        """
        heads = self.head.values() if isinstance(self.head, nn.ModuleDict) else [self.head]
        with torch.no_grad():
            for head in heads:
                assert isinstance(head, nn.Linear)
                head.weight.zero_()
                if bias and head.bias is not None:
                    head.bias.zero_()

    def optimizer_param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The trainable parameters as optimiser parameter groups, each with its ``lr``.

        One group at ``lr`` for every trainable parameter but those of an encoder's linear
        path (an encoder with a ``linear`` module and a ``linear_lr_scale``, such as the
        tabular encoder with ``linear_path``), which get a group each at
        ``lr * linear_lr_scale``: a path starting at zero must grow to a logistic
        regression's coefficients within the steps AdamW (about ``lr`` a step) has.

        Parameters
        ----------
        lr : float
            The optimiser's learning rate.

        Returns
        -------
        list of dict
            ``[{"params": [...], "lr": lr}, {"params": [...], "lr": lr * scale}, ...]``
            (groups without parameters left out), for ``torch.optim.AdamW(groups, ...)``.
        """
        groups = self.linear_path_groups(lr)
        special = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in special]
        return ([{"params": rest, "lr": lr}] if rest else []) + groups

    def group_counts(self, modality_counts: Mapping[str, int], n_samples: int) -> dict[str, int]:
        """Samples that trained each parameter group, keyed by prefix (for a federated reply).

        Parameters
        ----------
        modality_counts : mapping of str to int
            Training patients with each modality present (missing modalities count 0).
        n_samples : int
            Training patients in total (the count of the shared groups).

        Returns
        -------
        dict of str to int
            One entry per prefix of :meth:`parameter_groups`.
        """
        return {
            prefix: int(n_samples if m is None else modality_counts.get(m, 0))
            for prefix, m in self.parameter_groups().items()
        }

    # ------------------------------------------------------------------ forward

    def check_mask(self, mask: torch.Tensor, patient_ids: Sequence[str] | None = None) -> None:
        """Raise :class:`NoModalityError` naming the patients whose mask row is empty.

        Parameters
        ----------
        mask : Tensor[B, M] of bool
            Presence mask, columns in :attr:`modalities` order.
        patient_ids : sequence of str or None
            Names of the rows (row numbers are used when absent).
        """
        if mask.ndim != 2 or mask.shape[1] != len(self.modalities):
            raise ValueError(
                f"presence mask must have shape [B, {len(self.modalities)}] (columns "
                f"{list(self.modalities)}), got {tuple(mask.shape)}"
            )
        empty = (~mask.bool().any(1)).nonzero().flatten().tolist()
        if empty:
            names = (
                [str(patient_ids[i]) for i in empty]
                if patient_ids is not None
                else [f"row {i}" for i in empty]
            )
            raise NoModalityError(names)

    def embed(self, inputs: Mapping[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Encode and project every modality: ``Tensor[B, M, dim]``, zeros where absent.

        Parameters
        ----------
        inputs : mapping of str to Tensor
            Per-modality inputs with ``B`` rows (raw inputs for encoder modules, embeddings
            for precomputed ones). A modality absent from every row may be left out.
            Precomputed embeddings must be floating point; they are cast to the model's
            dtype (float64 rows loaded with numpy run in a float32 model).
        mask : Tensor[B, M] of bool
            Presence mask.

        Returns
        -------
        Tensor[B, M, dim]
        """
        b = mask.shape[0]
        out: list[torch.Tensor] = []
        ref = next(self.parameters())
        for j, m in enumerate(self.modalities):
            rows = mask[:, j].nonzero().flatten()
            z = torch.zeros(b, self.dim, dtype=ref.dtype, device=mask.device)
            if rows.numel() > 0 or self.dense:
                x = self._input(inputs, m, b, int(rows.numel()))
                if self.dense:  # every row through the encoder; absent rows zeroed after it
                    keep = mask[:, j].to(z.dtype).unsqueeze(1)
                    z = self.proj[m](self.encoders[m](x)).to(z.dtype) * keep
                else:
                    e = self.encoders[m](x.index_select(0, rows))
                    z = z.index_copy(0, rows, self.proj[m](e).to(z.dtype))
            out.append(z)
        return torch.stack(out, 1)

    def _input(self, inputs: Mapping[str, torch.Tensor], m: str, b: int,
               present: int) -> torch.Tensor:
        """Modality ``m``'s input of ``b`` rows, checked (``present``: rows that have it)."""
        if m not in inputs:
            raise ValueError(
                f"modality {m!r} is present for {present} row(s) but missing from the inputs "
                f"(got keys {sorted(inputs)})" if present else
                f"modality {m!r} is missing from the inputs (got keys {sorted(inputs)}); a "
                "dense model runs every encoder on every batch: give filler rows (zeros)"
            )
        x = inputs[m]
        if x.shape[0] != b:
            raise ValueError(
                f"input {m!r} has {x.shape[0]} rows but the mask has {b}; they must match"
            )
        if m in self.precomputed:
            if x.ndim != 2 or x.shape[1] != self.input_dims[m]:
                raise ValueError(
                    f"precomputed {m!r} embeddings must have shape [B, {self.input_dims[m]}],"
                    f" got {tuple(x.shape)}"
                )
            if not x.is_floating_point():
                raise ValueError(
                    f"precomputed {m!r} embeddings must be a floating-point tensor, got dtype "
                    f"{x.dtype}"
                )
            # e.g. float64 rows loaded with numpy: the projection's dtype (float32 unchanged)
            x = x.to(next(self.proj[m].parameters()).dtype)
        return x

    def forward(
        self,
        inputs: Mapping[str, torch.Tensor],
        mask: torch.Tensor,
        *,
        patient_ids: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Return one logit per patient.

        Parameters
        ----------
        inputs : mapping of str to Tensor
            Per-modality inputs, ``B`` rows each (see :meth:`embed`).
        mask : Tensor[B, M] of bool
            Presence mask, columns in :attr:`modalities` order.
        patient_ids : sequence of str or None
            Row names used in the error for patients with no modality.

        Returns
        -------
        Tensor[B]
            Logits (apply a sigmoid for probabilities).

        Raises
        ------
        NoModalityError
            When a row of ``mask`` has no modality present.
        """
        mask = mask.bool()
        self.check_mask(mask, patient_ids)
        if self.training and self.modality_dropout > 0:
            mask = modality_dropout(mask, self.modality_dropout)
        z = self.embed(inputs, mask)
        maskf = mask.to(z.dtype)
        if self.kind == "concat":
            h = self.fusion(torch.cat([z.flatten(1), maskf], 1))
            logit: torch.Tensor = self.head(h).squeeze(1)
        elif self.kind == "attention":
            logit = self.head(self.fusion(z, mask)).squeeze(1)
        else:
            assert isinstance(self.head, nn.ModuleDict)
            total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
            for j, m in enumerate(self.modalities):
                # a head absent from the batch gets no gradient (dense: a gradient of 0)
                if self.dense or bool(mask[:, j].any()):
                    total = total + self.head[m](z[:, j]).squeeze(1) * maskf[:, j]
            logit = total / maskf.sum(1)
        wide = self.linear_logits(inputs, mask)
        return logit if wide is None else logit + wide.to(logit.dtype)

    def linear_logits(self, inputs: Mapping[str, torch.Tensor],
                      mask: torch.Tensor) -> torch.Tensor | None:
        """Sum of the encoders' linear-path logits over the modalities present: ``Tensor[B]``.

        An encoder takes part when it has a ``linear_logit(x)`` method that returns
        ``Tensor[B]`` (the tabular encoder with ``linear_path``); it runs on the rows where
        its modality is present (dense: on every row, zeroed where absent). ``None`` when no
        encoder has a linear path. :meth:`forward` adds it to the fused logit (wide and deep).

        Parameters
        ----------
        inputs : mapping of str to Tensor
            As :meth:`embed`.
        mask : Tensor[B, M] of bool
            Presence mask (after modality dropout).

        Returns
        -------
        Tensor[B] or None
        """
        b = mask.shape[0]
        total: torch.Tensor | None = None
        for j, m in enumerate(self.modalities):
            fn = getattr(self.encoders[m], "linear_logit", None)
            if fn is None or getattr(self.encoders[m], "linear", None) is None:
                continue
            rows = mask[:, j].nonzero().flatten()
            if rows.numel() == 0 and not self.dense:
                continue
            x = self._input(inputs, m, b, int(rows.numel()))
            if self.dense:
                w = fn(x) * mask[:, j].to(x.dtype if x.is_floating_point() else torch.float32)
            else:
                part = fn(x.index_select(0, rows))
                w = torch.zeros(b, dtype=part.dtype, device=part.device).index_copy(0, rows, part)
            total = w if total is None else total + w
        return total


class _AttentionFusion(nn.Module):
    """CLS token + modality-type embeddings + one Transformer encoder layer."""

    def __init__(self, n_modalities: int, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.type_embed = nn.Parameter(torch.zeros(1, n_modalities, dim))
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.type_embed, std=0.02)
        self.layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=heads,
            dim_feedforward=2 * dim,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fuse ``z: Tensor[B, M, dim]`` under ``mask: Tensor[B, M]``; return ``Tensor[B, dim]``."""
        b = z.shape[0]
        if b == 0:  # the attention's reshapes are ambiguous with no rows
            return z.new_zeros((0, z.shape[-1]))
        tokens = torch.cat([self.cls.expand(b, -1, -1), z + self.type_embed], 1)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=mask.device), ~mask], 1)
        out = self.layer(tokens, src_key_padding_mask=pad)
        cls: torch.Tensor = self.norm(out[:, 0])
        return cls
