"""Image encoder: a MONAI backbone (2D or 3D from one code path) and a projection head.

``ImageEncoder(name, spatial_dims=2, in_channels=1, embed_dim=128)`` maps a batch
``Tensor[B, C, *spatial]`` to ``Tensor[B, embed_dim]``. MONAI is imported only when an
encoder is constructed (``import monai`` takes seconds).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from multimodal_fl.config import image_min_size
from multimodal_fl.encoders._common import (
    LoadReport,
    load_weights_into,
    read_state_dict,
    section_to_kwargs,
    state_fingerprint,
)

# monai is heavy to import: imported inside the functions that use it

__all__ = ["BACKBONES", "ImageEncoder", "SmallCNN", "build_backbone"]


class SmallCNN(nn.Module):
    """A compact CNN (conv-norm-ReLU-pool blocks, global average pool): fast on CPU.

    Parameters
    ----------
    spatial_dims : int
        2 or 3.
    in_channels : int
        Input channels.
    channels : tuple of int, default (16, 32, 64, 128)
        Output channels of each block; each block halves the spatial size except the last.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, channels: tuple[int, ...] = (16, 32, 64, 128)
    ) -> None:
        super().__init__()
        from monai.networks.layers.factories import Conv, Norm, Pool

        conv = Conv[Conv.CONV, spatial_dims]
        norm = Norm[Norm.BATCH, spatial_dims]
        pool = Pool[Pool.MAX, spatial_dims]
        gap = Pool[Pool.ADAPTIVEAVG, spatial_dims]
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(channels):
            layers += [
                conv(c_in, c_out, kernel_size=3, padding=1, bias=False),
                norm(c_out),
                nn.ReLU(),
            ]
            if i < len(channels) - 1:
                layers.append(pool(kernel_size=2, ceil_mode=True))
            c_in = c_out
        layers += [gap(1), nn.Flatten(1)]
        self.features = nn.Sequential(*layers)
        self.out_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return pooled features ``Tensor[B, out_features]``."""
        out: torch.Tensor = self.features(x)
        return out


def _densenet121(spatial_dims: int, in_channels: int) -> tuple[nn.Module, int]:
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
    out_layer: Any = net.class_layers.out
    width = int(out_layer.in_features)
    net.class_layers.out = nn.Identity()  # keep relu -> pool -> flatten; drop the classifier
    return net, width


def _resnet(depth: int) -> Callable[[int, int], tuple[nn.Module, int]]:
    def build(spatial_dims: int, in_channels: int) -> tuple[nn.Module, int]:
        from monai.networks import nets

        factory = getattr(nets, f"resnet{depth}")
        net = factory(
            pretrained=False,
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            feed_forward=False,
        )
        return net, int(net.layer4[-1].bn2.num_features)  # basic blocks: expansion 1

    return build


def _smallcnn(spatial_dims: int, in_channels: int) -> tuple[nn.Module, int]:
    net = SmallCNN(spatial_dims, in_channels)
    return net, net.out_features


def _tinycnn(spatial_dims: int, in_channels: int) -> tuple[nn.Module, int]:
    # Three narrow blocks: CPU conv3d backward is slow, so the 3D demo needs this size.
    net = SmallCNN(spatial_dims, in_channels, channels=(8, 16, 32))
    return net, net.out_features


#: Backbone factories by name: ``(spatial_dims, in_channels) -> (module, feature_width)``.
BACKBONES: dict[str, Callable[[int, int], tuple[nn.Module, int]]] = {
    "smallcnn": _smallcnn,
    "tinycnn": _tinycnn,
    "densenet121": _densenet121,
    "resnet10": _resnet(10),
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
}


def build_backbone(name: str, spatial_dims: int, in_channels: int) -> tuple[nn.Module, int]:
    """Build a backbone by name.

    Parameters
    ----------
    name : str
        One of :data:`BACKBONES` (``tinycnn``, ``smallcnn``, ``densenet121``, ``resnet10``,
        ``resnet18``, ``resnet34``).
    spatial_dims : int
        2 or 3.
    in_channels : int
        Number of input channels (at least 1).

    Returns
    -------
    (nn.Module, int)
        The backbone (``Tensor[B, C, *spatial] -> Tensor[B, width]``) and its feature width.
    """
    if name not in BACKBONES:
        close = difflib.get_close_matches(name, list(BACKBONES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown image encoder {name!r}{hint}; accepted: {sorted(BACKBONES)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels!r}")
    return BACKBONES[name](spatial_dims, int(in_channels))


class ImageEncoder(nn.Module):
    """MONAI backbone + projection head: ``Tensor[B, C, *spatial] -> Tensor[B, output_dim]``.

    Parameters
    ----------
    encoder : str, default "smallcnn"
        Backbone name: ``smallcnn`` (fast CPU default), ``densenet121``, ``resnet10``,
        ``resnet18`` or ``resnet34`` (MONAI networks, random initialisation).
    spatial_dims : int, default 2
        2 (e.g. chest X-ray) or 3 (e.g. brain MRI volume); same code path.
    in_channels : int, default 1
        Input channels.
    embed_dim : int or None, default 128
        Size of the projection head's output (``output_dim``). ``None`` means no head:
        ``output_dim`` is the backbone's feature width.
    dropout : float, default 0.0
        Dropout before the projection.
    frozen : bool, default False
        Freeze the backbone (its parameters get ``requires_grad=False`` and it stays in
        eval mode); the head stays trainable.
    weights : path-like or None
        Local weights file loaded after construction (see :meth:`load_weights`, non-strict).

    Attributes
    ----------
    backbone : nn.Module
        The MONAI network without its classifier.
    head : nn.Module
        Dropout + linear projection (identity when ``embed_dim`` is None).
    output_dim : int
        Embedding size.
    load_report : LoadReport or None
        Report of the weights loaded by the constructor, if any.

    Examples
    --------
    >>> import torch
    >>> enc = ImageEncoder("smallcnn", spatial_dims=3, in_channels=1, embed_dim=8)
    >>> enc(torch.zeros(2, 1, 16, 16, 16)).shape
    torch.Size([2, 8])
    """

    def __init__(
        self,
        encoder: str = "smallcnn",
        *,
        spatial_dims: int = 2,
        in_channels: int = 1,
        embed_dim: int | None = 128,
        dropout: float = 0.0,
        frozen: bool = False,
        weights: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.backbone, self.feature_dim = build_backbone(
            encoder, self.spatial_dims, self.in_channels
        )
        if embed_dim is None:
            self.head: nn.Module = nn.Identity()
            self.output_dim = self.feature_dim
        else:
            if int(embed_dim) < 1:
                raise ValueError(f"embed_dim must be a positive integer or None, got {embed_dim!r}")
            self.head = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(self.feature_dim, int(embed_dim))
            )
            self.output_dim = int(embed_dim)
        self.frozen = bool(frozen)
        if self.frozen:
            self.backbone.requires_grad_(False)
        self.load_report: LoadReport | None = None
        if weights is not None:
            self.load_report = self.load_weights(weights)
        if self.frozen:
            self.backbone.eval()

    @classmethod
    def from_config(cls, section: Any) -> ImageEncoder:
        """Build from a config section such as ``{encoder: densenet121, spatial_dims: 2}``.

        Keys used by the transforms or the training loop (``size``, ``pixdim``, ``modality``,
        ``augment``, ``cache``) are accepted and ignored here; an unknown key raises
        ``ValueError`` with a suggestion. ``embed_dim: None`` means no head, as in the
        constructor; a section without ``embed_dim`` gets the default head.
        """
        kwargs = section_to_kwargs(
            section,
            accepted=(
                "encoder",
                "spatial_dims",
                "in_channels",
                "embed_dim",
                "dropout",
                "frozen",
                "weights",
            ),
            ignored=("size", "pixdim", "modality", "augment", "cache", "batch_size", "enabled"),
            where="modalities.image",
            keep_none=("embed_dim",),  # None: no head, as in the constructor
        )
        return cls(**kwargs)

    @property
    def projection(self) -> nn.Linear | None:
        """The head's linear layer (``None`` when ``embed_dim`` is None)."""
        layers = [m for m in self.head.modules() if isinstance(m, nn.Linear)]
        return layers[0] if layers else None

    def train(self, mode: bool = True) -> ImageEncoder:
        """Set training mode; a frozen backbone stays in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch.

        Parameters
        ----------
        x : Tensor[B, in_channels, *spatial]
            ``spatial_dims`` spatial axes; floating point (cast to the parameters' dtype,
            float32 input to a float32 encoder unchanged). ``B`` may be 0.

        Returns
        -------
        Tensor[B, output_dim]

        Raises
        ------
        ValueError
            For another shape, a non-floating dtype (convert 8-bit pixels first, e.g.
            ``x.float() / 255``) or a spatial axis below the backbone's minimum.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ImageEncoder expects Tensor[B, {self.in_channels}, "
                f"{', '.join(['S'] * self.spatial_dims)}] "
                f"(spatial_dims={self.spatial_dims}, in_channels={self.in_channels}), "
                f"got shape {tuple(x.shape)}"
            )
        x = self._floating(x)
        least = image_min_size(self.encoder, self.spatial_dims)
        if min(x.shape[2:]) < least:
            raise ValueError(
                f"ImageEncoder {self.encoder!r} needs at least {least} pixels per spatial axis "
                f"({self.spatial_dims}D), got spatial size {tuple(x.shape[2:])}"
            )
        if x.shape[0] == 0:  # BatchNorm and some backbones' reshapes fail on no rows
            return x.new_zeros((0, self.output_dim))
        return self.forward_head(self.forward_features(x))

    def _floating(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the parameters' dtype; a one-line error for a non-floating tensor."""
        if not x.is_floating_point():
            raise ValueError(
                f"ImageEncoder expects a floating-point tensor, got dtype {x.dtype}; convert "
                "it first (e.g. x.float() / 255 for 8-bit pixels, or read files with load_image)"
            )
        return x.to(next(self.parameters()).dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone only: ``Tensor[B, feature_dim]`` (what a cache of a frozen backbone stores)."""
        x = self._floating(x)
        if x.shape[0] == 0:
            return x.new_zeros((0, self.feature_dim))
        if self.frozen:
            with torch.no_grad():
                feats: torch.Tensor = self.backbone(x)
        else:
            feats = self.backbone(x)
        return feats

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Projection head only: ``Tensor[B, feature_dim] -> Tensor[B, output_dim]``."""
        out: torch.Tensor = self.head(features)
        return out

    def load_weights(self, path: str | os.PathLike[str], *, strict: bool = False) -> LoadReport:
        """Load weights from a local safetensors file or torch state dict; never downloads.

        Keys may be the encoder's own (``backbone.*``, ``head.*``) or a bare backbone's
        (e.g. a MONAI ``DenseNet121`` state dict): when no key starts with ``backbone.``
        or ``head.``, the file is loaded into the backbone.

        Parameters
        ----------
        path : path-like
            The weights file.
        strict : bool, default False
            Raise on any missing/unexpected/mismatched key instead of reporting it.

        Returns
        -------
        LoadReport
            Missing, unexpected and mismatched keys (also logged as a warning).
        """
        keys = read_state_dict(path).keys()
        if any(k.startswith(("backbone.", "head.")) for k in keys):
            return load_weights_into(self, path, strict=strict)
        return load_weights_into(self.backbone, path, strict=strict)

    def fingerprint(self, preprocessing: str = "", *, backbone_only: bool = False) -> str:
        """Hash of the weights, architecture and a preprocessing description (for caches).

        Parameters
        ----------
        preprocessing : str
            Description of the preprocessing (e.g. ``ImageTransformSpec.describe()``).
        backbone_only : bool, default False
            Hash only the backbone: the key for caching :meth:`forward_features` of a frozen
            backbone while the head trains.
        """
        if backbone_only:
            return state_fingerprint(
                self.backbone,
                f"ImageEncoder.backbone({self.encoder},{self.spatial_dims},{self.in_channels})",
                preprocessing,
            )
        return state_fingerprint(
            self,
            f"ImageEncoder({self.encoder},{self.spatial_dims},{self.in_channels},{self.output_dim})",
            preprocessing,
        )
