"""FusionModel: every fusion kind with every subset of modalities, errors, groups, dropout."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from multimodal_fl.fusion import (
    FUSION_KINDS,
    MODALITIES,
    FusionModel,
    NoModalityError,
    modality_dropout,
)

torch.set_num_threads(1)

IMG = (1, 8, 8)
N_TAB = 5
TEXT_DIM = 6


class TinyImage(nn.Module):
    """Stand-in image encoder: conv + BatchNorm + pooling (BatchNorm must never see filler rows)."""

    output_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(x).all():
            raise AssertionError("an absent image reached the encoder")
        out: torch.Tensor = self.net(x)
        return out


class TinyTabular(nn.Module):
    """Stand-in tabular encoder (NaN -> 0)."""

    output_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(N_TAB, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(torch.nan_to_num(x))
        return out


def make_model(kind: str, **kw: float) -> FusionModel:
    torch.manual_seed(0)
    return FusionModel(
        {"image": TinyImage(), "tabular": TinyTabular(), "text": TEXT_DIM},
        kind=kind, dim=8, heads=2, dropout=0.0, **kw,
    )


def make_inputs(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, *IMG, generator=g),
        "tabular": torch.randn(b, N_TAB, generator=g),
        "text": torch.randn(b, TEXT_DIM, generator=g),
    }


SUBSETS = [
    s for r in range(1, len(MODALITIES) + 1) for s in itertools.combinations(MODALITIES, r)
]


def subset_mask(subsets: list[tuple[str, ...]]) -> torch.Tensor:
    return torch.tensor([[m in s for m in MODALITIES] for s in subsets])


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_every_subset_per_patient_predicts_and_ignores_absent_inputs(kind: str) -> None:
    model = make_model(kind).eval()
    mask = subset_mask(SUBSETS)  # one patient per non-empty subset, 7 rows
    x = make_inputs(len(SUBSETS))
    out = model(x, mask)
    assert out.shape == (len(SUBSETS),)
    assert torch.isfinite(out).all()
    # absent inputs may hold anything (even NaN): predictions must not change
    garbage = {m: t.clone() for m, t in x.items()}
    for j, m in enumerate(MODALITIES):
        garbage[m][~mask[:, j]] = float("nan")
    assert torch.equal(model(garbage, mask), out)
    # a patient's prediction depends only on its own row
    for i in range(len(SUBSETS)):
        single = model({m: t[i : i + 1] for m, t in x.items()}, mask[i : i + 1])
        torch.testing.assert_close(single, out[i : i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", FUSION_KINDS)
@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(s))
def test_every_subset_for_a_whole_batch_trains_only_present_modalities(
    kind: str, subset: tuple[str, ...]
) -> None:
    model = make_model(kind).train()
    mask = subset_mask([subset] * 4)
    x = {m: t for m, t in make_inputs(4).items() if m in subset}  # absent inputs left out
    out = model(x, mask)
    assert out.shape == (4,) and torch.isfinite(out).all()
    out.sum().backward()
    groups = model.parameter_groups()
    for name, p in model.named_parameters():
        prefix = max((g for g in groups if name.startswith(g)), key=len)
        modality = groups[prefix]
        if modality is not None and modality not in subset:
            assert p.grad is None, f"{name} got a gradient though {modality} is absent"
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert any(n.startswith(f"proj.{subset[0]}.") for n in trained)


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_patient_with_no_modality_is_an_error_naming_it(kind: str) -> None:
    model = make_model(kind)
    mask = subset_mask([("image",), ("text",), ("tabular",)])
    mask[1] = False
    mask[2] = False
    with pytest.raises(NoModalityError, match="p1, p2") as info:
        model(make_inputs(3), mask, patient_ids=["p0", "p1", "p2"])
    assert info.value.patient_ids == ["p1", "p2"]
    with pytest.raises(NoModalityError, match="row 1"):
        model(make_inputs(3), mask)


def test_modality_dropout_never_drops_every_present_modality() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(5000, 3, generator=g) < 0.6
    mask[0] = False  # a row with nothing stays empty
    kept = modality_dropout(mask, 0.9, generator=g)
    assert not (kept & ~mask).any(), "dropout added a modality"
    assert torch.equal(kept.any(1), mask.any(1)), "a patient lost every modality"
    multi = mask.sum(1) >= 2
    dropped = (mask & ~kept)[multi].sum() / mask[multi].sum()
    assert 0.4 < float(dropped) < 0.9  # plenty dropped where there was a choice, not all
    single = mask.sum(1) == 1
    assert torch.equal(kept[single], mask[single])  # a lone modality is always kept
    assert torch.equal(modality_dropout(mask, 0.0), mask)


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_dropout_in_training_mode_only(kind: str) -> None:
    model = make_model(kind, modality_dropout=0.5)
    mask = subset_mask(SUBSETS)
    x = make_inputs(len(SUBSETS))
    model.eval()
    a, b = model(x, mask), model(x, mask)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(1)
    outs = {tuple(model(x, mask).detach().tolist()) for _ in range(5)}
    assert len(outs) > 1  # modality dropout changes training-mode outputs


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_parameter_groups_cover_every_parameter(kind: str) -> None:
    model = make_model(kind)
    groups = model.parameter_groups()
    for m in MODALITIES:
        assert groups[f"encoders.{m}."] == m
        assert groups[f"proj.{m}."] == m
    assert groups["fusion."] is None and groups["head."] is None
    for name, _ in model.named_parameters():
        assert any(name.startswith(g) for g in groups), name
    if kind == "late":
        assert groups["head.text."] == "text"
    # the encoder of the image modality is grouped under its prefix
    assert any(n.startswith("encoders.image.net.") for n, _ in model.named_parameters())
    counts = model.group_counts({"image": 3, "text": 0}, 10)
    assert counts["encoders.image."] == 3 and counts["proj.text."] == 0
    assert counts["proj.tabular."] == 0 and counts["head."] == 10


def test_model_with_fewer_modalities_has_only_their_groups() -> None:
    model = FusionModel({"text": 4}, kind="concat", dim=4)
    assert model.modalities == ("text",)
    assert set(model.parameter_groups()) == {"encoders.text.", "proj.text.", "fusion.", "head."}


def test_construction_errors_say_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="divisible"):
        FusionModel({"text": 4}, kind="attention", dim=6, heads=4)
    with pytest.raises(ValueError, match="unknown modality"):
        FusionModel({"audio": 4})
    with pytest.raises(ValueError, match="concat"):
        FusionModel({"text": 4}, kind="sum")
    with pytest.raises(ValueError, match="output_dim"):
        FusionModel({"image": nn.Linear(2, 2)})
    model = FusionModel({"text": 4, "tabular": 3})
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        model({"text": torch.zeros(2, 4)}, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        model({"text": torch.zeros(2, 5), "tabular": torch.zeros(2, 3)},
              torch.ones(2, 2, dtype=torch.bool))


def test_text_encoder_module_is_refused_with_the_width_to_pass(tiny_bert: Path) -> None:
    from multimodal_fl.encoders import TextEncoder

    text = TextEncoder(tiny_bert)
    with pytest.raises(ValueError, match=rf"does not take a tensor.*'text': {text.output_dim}"):
        FusionModel({"tabular": 3, "text": text})
    model = FusionModel({"tabular": 3, "text": text.output_dim}, dim=8)  # the embeddings' width
    with torch.no_grad():
        emb = text(["fever", "cough"])
    assert model({"tabular": torch.zeros(2, 3), "text": emb},
                 torch.ones(2, 2, dtype=torch.bool)).shape == (2,)


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_float64_embeddings_are_cast_and_integer_ones_refused(kind: str) -> None:
    model = make_model(kind).eval()
    x, mask = make_inputs(4), torch.ones(4, 3, dtype=torch.bool)
    with torch.no_grad():
        ref = model(x, mask)
        out = model({**x, "text": x["text"].double()}, mask)  # e.g. rows loaded with numpy
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    with pytest.raises(ValueError, match=r"'text' embeddings must be a floating-point tensor"):
        model({**x, "text": x["text"].long()}, mask)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_empty_batch_gives_no_logits(kind: str, dense: bool) -> None:
    torch.manual_seed(0)
    model = FusionModel({"tabular": TinyTabular(), "text": TEXT_DIM}, kind=kind, dim=8,
                        heads=2, dense=dense)
    x = {k: v[:0] for k, v in make_inputs(1).items() if k != "image"}
    for mode in (True, False):
        out = model.train(mode)(x, torch.zeros(0, 2, dtype=torch.bool))
        assert out.shape == (0,) and out.dtype == torch.float32
