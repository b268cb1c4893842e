"""ImageEncoder: backbones in 2D and 3D, channels, head, freezing, config, user weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from multimodal_fl.encoders import ImageEncoder


@pytest.mark.parametrize(
    ("name", "spatial_dims", "side"),
    [
        ("smallcnn", 2, 28),
        ("smallcnn", 3, 16),
        ("resnet10", 3, 16),
        ("resnet18", 2, 32),
        ("resnet34", 2, 32),
        ("densenet121", 2, 32),
        ("densenet121", 3, 32),
    ],
)
def test_forward_shape_2d_3d(name: str, spatial_dims: int, side: int) -> None:
    torch.manual_seed(0)
    enc = ImageEncoder(name, spatial_dims=spatial_dims, in_channels=2, embed_dim=7).eval()
    x = torch.randn(3, 2, *([side] * spatial_dims))
    out = enc(x)
    assert out.shape == (3, 7)
    assert enc.output_dim == 7
    assert torch.isfinite(out).all()
    # rows are embedded independently (eval mode): a different image gives a different row
    assert not torch.allclose(out[0], out[1])


def test_no_head_gives_backbone_width() -> None:
    enc = ImageEncoder("resnet18", spatial_dims=2, embed_dim=None).eval()
    assert enc.output_dim == 512
    assert enc(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_wrong_input_shape_and_unknown_name() -> None:
    enc = ImageEncoder("smallcnn", spatial_dims=2, in_channels=1)
    with pytest.raises(ValueError, match=r"spatial_dims=2, in_channels=1"):
        enc(torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"did you mean 'densenet121'"):
        ImageEncoder("densenet12")
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        ImageEncoder("smallcnn", spatial_dims=1)


def test_frozen_backbone_gets_no_gradient_and_stays_eval() -> None:
    enc = ImageEncoder("smallcnn", spatial_dims=2, embed_dim=4, frozen=True)
    enc.train()
    assert not enc.backbone.training and enc.head.training
    enc(torch.randn(2, 1, 16, 16)).sum().backward()
    assert all(p.grad is None for p in enc.backbone.parameters())
    assert all(p.grad is not None for p in enc.head.parameters())


def test_from_config_and_unknown_key() -> None:
    enc = ImageEncoder.from_config(
        {"encoder": "resnet10", "spatial_dims": 3, "size": 64, "embed_dim": 5, "frozen": False}
    )
    assert enc.encoder == "resnet10" and enc.spatial_dims == 3 and enc.output_dim == 5
    with pytest.raises(ValueError, match="did you mean 'embed_dim'"):
        ImageEncoder.from_config({"encoder": "smallcnn", "embed_dimm": 5})


def _proj(enc: ImageEncoder) -> torch.nn.Linear:
    proj = enc.projection
    assert proj is not None
    return proj


def _perturbed_state(enc: ImageEncoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() + 1.0 if v.is_floating_point() else v.clone()
            for k, v in enc.state_dict().items()}  # fmt: skip


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_load_matching_weights(tmp_path: Path, fmt: str) -> None:
    enc = ImageEncoder("smallcnn", spatial_dims=2, embed_dim=4)
    state = _perturbed_state(enc)
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    report = ImageEncoder("smallcnn", spatial_dims=2, embed_dim=4).load_weights(path)
    assert report.ok and not report.missing and not report.unexpected
    loaded = ImageEncoder("smallcnn", spatial_dims=2, embed_dim=4, weights=path)
    assert loaded.load_report is not None and loaded.load_report.ok
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_mismatching_weights_reports_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    enc = ImageEncoder("smallcnn", spatial_dims=2, embed_dim=4)
    state = _perturbed_state(enc)
    dropped = "head.1.bias"
    del state[dropped]
    state["head.9.weight"] = torch.zeros(3)
    state["head.1.weight"] = torch.zeros(9, 128)  # wrong shape
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    target = ImageEncoder("smallcnn", spatial_dims=2, embed_dim=4)
    before = _proj(target).weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="multimodal_fl.encoders"):
        report = target.load_weights(path)
    assert report.missing == (dropped,)
    assert report.unexpected == ("head.9.weight",)
    assert len(report.mismatched) == 1 and report.mismatched[0].startswith("head.1.weight")
    assert not report.ok
    assert "missing" in caplog.text and "head.9.weight" in caplog.text
    assert torch.equal(_proj(target).weight, before)  # mismatched key not loaded
    k = "backbone.features.0.weight"
    assert torch.equal(target.state_dict()[k], state[k])  # matching keys loaded
    with pytest.raises(ValueError, match="do not match"):
        ImageEncoder("smallcnn", spatial_dims=2, embed_dim=4).load_weights(path, strict=True)


def test_load_bare_backbone_weights(tmp_path: Path) -> None:
    """A MONAI network's own state dict (no ``backbone.`` prefix) loads into the backbone."""
    from monai.networks.nets import resnet10

    torch.manual_seed(1)
    net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False)
    path = tmp_path / "resnet10.pt"
    torch.save(net.state_dict(), path)
    enc = ImageEncoder("resnet10", spatial_dims=3, embed_dim=4)
    report = enc.load_weights(path)
    assert report.ok, report
    backbone: Any = enc.backbone
    assert torch.equal(backbone.conv1.weight, net.conv1.weight)


def test_load_weights_errors(tmp_path: Path) -> None:
    enc = ImageEncoder("smallcnn")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        enc.load_weights(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not read weights"):
        enc.load_weights(junk)
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="no key"):
        enc.load_weights(other)


def test_fingerprint_tracks_weights_and_preprocessing() -> None:
    torch.manual_seed(0)
    a = ImageEncoder("smallcnn", embed_dim=4)
    b = ImageEncoder("smallcnn", embed_dim=4)
    b.load_state_dict(a.state_dict())
    assert a.fingerprint("size=64") == b.fingerprint("size=64")
    assert a.fingerprint("size=64") != a.fingerprint("size=32")
    with torch.no_grad():
        _proj(b).bias.add_(1e-3)
    assert a.fingerprint("size=64") != b.fingerprint("size=64")


def test_features_and_head_compose_and_backbone_fingerprint() -> None:
    torch.manual_seed(0)
    enc = ImageEncoder("smallcnn", embed_dim=4, frozen=True).eval()
    x = torch.randn(2, 1, 16, 16)
    feats = enc.forward_features(x)
    assert feats.shape == (2, enc.feature_dim)
    torch.testing.assert_close(enc.forward_head(feats), enc(x))
    before_all, before_bb = enc.fingerprint("p"), enc.fingerprint("p", backbone_only=True)
    with torch.no_grad():
        _proj(enc).weight.add_(1.0)  # training the head
    assert enc.fingerprint("p") != before_all
    assert enc.fingerprint("p", backbone_only=True) == before_bb


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_densenet_minimum_size_is_real_and_refused_below(spatial_dims: int) -> None:
    from multimodal_fl.config import image_min_size

    least = image_min_size("densenet121", spatial_dims)
    enc = ImageEncoder("densenet121", spatial_dims=spatial_dims, embed_dim=4).eval()
    ok = torch.zeros(1, 1, *([least] * spatial_dims))
    assert enc(ok).shape == (1, 4)
    below = torch.zeros(1, 1, least - 1, *([least] * (spatial_dims - 1)))
    with pytest.raises(RuntimeError):  # the network itself cannot process one axis less
        enc.backbone(below)
    with pytest.raises(ValueError, match=rf"'densenet121' needs at least {least} .*"
                                         rf"got spatial size \({least - 1}, "):
        enc(below)


@pytest.mark.parametrize("name", ["tinycnn", "smallcnn", "resnet10", "resnet18", "resnet34"])
def test_other_backbones_take_any_size(name: str) -> None:
    from multimodal_fl.config import image_min_size

    assert image_min_size(name, 2) == image_min_size(name, 3) == 1
    assert ImageEncoder(name, embed_dim=4).eval()(torch.zeros(1, 1, 1, 1)).shape == (1, 4)


def test_from_config_embed_dim_none_means_no_head() -> None:
    from multimodal_fl.config import ImageModalityConfig

    none = ImageEncoder.from_config({"encoder": "smallcnn", "embed_dim": None})
    assert none.projection is None and none.output_dim == none.feature_dim == 128
    assert ImageEncoder.from_config({"encoder": "smallcnn"}).output_dim == 128  # default head
    assert ImageEncoder.from_config({"encoder": "smallcnn"}).projection is not None
    assert ImageEncoder.from_config(ImageModalityConfig(embed_dim=16)).output_dim == 16
    assert ImageEncoder.from_config(ImageModalityConfig()).output_dim == 64  # config default


def test_floating_input_is_cast_and_integer_input_refused() -> None:
    torch.manual_seed(0)
    enc = ImageEncoder("smallcnn", embed_dim=4).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        ref = enc(x)
        assert torch.equal(enc(x.double()), ref)  # float64 pixels: cast to float32
        assert enc(x.half()).dtype == torch.float32
        assert enc.double()(x).dtype == torch.float64  # a float64 encoder takes float32
    with pytest.raises(ValueError, match=r"floating-point tensor, got dtype torch.uint8"):
        enc((x * 255).to(torch.uint8))


@pytest.mark.parametrize("name", ["smallcnn", "resnet10", "resnet18", "densenet121"])
def test_empty_batch_gives_empty_embeddings(name: str) -> None:
    enc = ImageEncoder(name, embed_dim=4)
    for mode in (True, False):
        out = enc.train(mode)(torch.zeros(0, 1, 32, 32))
        assert out.shape == (0, 4) and out.dtype == torch.float32
    assert enc.forward_features(torch.zeros(0, 1, 32, 32)).shape == (0, enc.feature_dim)
