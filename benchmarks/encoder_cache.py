"""Time whole training epochs with frozen image and text encoders, with the embedding cache.

Each epoch walks every site's patients in mini-batches: image embeddings (frozen
``ImageEncoder`` over the MONAI evaluation pipeline) and note embeddings (frozen
``TextEncoder``, all-MiniLM-L6-v2) come through ``EmbeddingCache.get_or_compute``; a small
fusion head (linear layer over [image, text, presence flags]) takes one optimiser step per
batch. Epoch 1 starts from an empty cache (compute + write); epoch 2 builds new cache
objects that read the shards from disk and re-hashes every image file (the in-process
file-hash memo is cleared), so it pays for all the lookups a later training run would.
Each repeat uses a fresh cache folder; the table reports medians over repeats.

Cohort: ``--cohort DIR`` (a task folder of site directories, e.g. ``sample_data/covid_oxygen``);
by default a snapshot copy of ``sample_data/covid_oxygen`` when present, else the generator
(``multimodal_fl.sample_data.generate``, default profile, seed 0) writes one to a temp folder.
Patients come from ``multimodal_fl.data.cohort.build_cohort`` with task ``covid_oxygen_24h``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/encoder_cache.py [--repeats 3] [--image-encoder densenet121]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multimodal_fl.encoders import (  # noqa: E402
    EmbeddingCache,
    ImageEncoder,
    ImageTransformSpec,
    TextEncoder,
    build_transform,
)
from multimodal_fl.encoders import cache as cache_module  # noqa: E402
from multimodal_fl.encoders.transforms import apply_transform  # noqa: E402


def load_cohort(cohort: Path | None, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """Per-site lists of (image path or None, notes) from the sample cohort."""
    from multimodal_fl.config import load_task
    from multimodal_fl.data.cohort import build_cohort

    if cohort is None:
        default = ROOT / "sample_data" / "covid_oxygen"
        if default.is_dir():
            # snapshot: the working tree's sample_data may be regenerated during the run
            cohort = Path(shutil.copytree(default, workdir / "snapshot" / "covid_oxygen"))
        else:
            from multimodal_fl.sample_data import generate

            generate(workdir / "sample", seed=0, profile="default", tasks=("covid_oxygen",))
            cohort = workdir / "sample" / "covid_oxygen"
    task = load_task("covid_oxygen_24h")
    sites: dict[str, Any] = {}
    for site_dir in sorted(p for p in cohort.iterdir() if p.is_dir()):
        table = build_cohort(site_dir, task, site_name=site_dir.name).table
        sites[site_dir.name] = {
            "images": [Path(p) if isinstance(p, str) and p else None for p in table["image_path"]],
            "notes": [list(n) if isinstance(n, list | tuple) else [] for n in table["notes"]],
            "label": table["label"].to_numpy(dtype=np.float32),
        }
    return cohort, sites


def run_epoch(
    sites: dict[str, Any],
    cache_root: Path,
    image_enc: ImageEncoder,
    image_fp: str,
    pipeline: Any,
    text_enc: TextEncoder,
    text_fp: str,
    head: nn.Module,
    opt: torch.optim.Optimizer,
    batch_size: int,
) -> tuple[float, int, int]:
    """One pass over every site; returns (seconds, items computed, items read from cache)."""
    cache_module.clear_file_hashes()
    t0 = time.perf_counter()
    computed = hits = 0

    def embed_images(paths: list[Path]) -> np.ndarray:
        batch = torch.stack([apply_transform(pipeline, p) for p in paths])
        with torch.no_grad():
            return image_enc(batch).numpy()

    def embed_notes(notes: list[list[str]]) -> np.ndarray:
        with torch.no_grad():
            return text_enc(notes).numpy()

    for site, data in sites.items():
        img_cache = EmbeddingCache(cache_root, fingerprint=image_fp, site=site)
        txt_cache = EmbeddingCache(cache_root, fingerprint=text_fp, site=site)
        n = len(data["label"])
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            imgs, notes = data["images"][sl], data["notes"][sl]
            b = len(imgs)
            img_emb = np.zeros((b, image_enc.output_dim), dtype=np.float32)
            has_img = [i for i, p in enumerate(imgs) if p is not None]
            if has_img:
                img_emb[has_img] = img_cache.get_or_compute(
                    [imgs[i] for i in has_img], embed_images
                )
            txt_emb = np.zeros((b, text_enc.output_dim), dtype=np.float32)
            has_txt = [i for i, nt in enumerate(notes) if nt]
            if has_txt:
                txt_emb[has_txt] = txt_cache.get_or_compute(
                    [notes[i] for i in has_txt], embed_notes
                )
            flags = np.zeros((b, 2), dtype=np.float32)
            flags[has_img, 0] = 1.0
            flags[has_txt, 1] = 1.0
            x = torch.from_numpy(np.concatenate([img_emb, txt_emb, flags], axis=1))
            y = torch.from_numpy(data["label"][sl])
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(head(x)[:, 0], y)
            loss.backward()
            opt.step()
        computed += img_cache.misses + txt_cache.misses
        hits += img_cache.hits + txt_cache.hits
    return time.perf_counter() - t0, computed, hits


def main() -> None:
    """Run the repeats and print the Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohort", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-encoder", default="densenet121")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    workdir = Path(tempfile.mkdtemp(prefix="mmfl_cache_bench_"))
    try:
        t0 = time.perf_counter()
        cohort, sites = load_cohort(args.cohort, workdir)
        load_s = time.perf_counter() - t0
        spec = ImageTransformSpec(spatial_dims=2, size=args.size)
        pipeline = build_transform(spec, train=False)
        image_enc = ImageEncoder(args.image_encoder, spatial_dims=2, embed_dim=None, frozen=True)
        image_enc.eval()
        text_enc = TextEncoder()
        image_fp = image_enc.fingerprint(spec.describe())
        text_fp = text_enc.fingerprint()
        n_pat = sum(len(d["label"]) for d in sites.values())
        n_img = sum(p is not None for d in sites.values() for p in d["images"])
        n_txt = sum(bool(n) for d in sites.values() for n in d["notes"])
        print(
            f"cohort {cohort}: {len(sites)} sites, {n_pat} patients, {n_img} images, "
            f"{n_txt} patients with notes (cohort built in {load_s:.0f} s)",
            file=sys.stderr,
        )
        firsts, seconds, ratios, sizes = [], [], [], []
        for rep in range(args.repeats):
            cache_root = workdir / f"cache{rep}"
            head = nn.Linear(image_enc.output_dim + text_enc.output_dim + 2, 1)
            opt = torch.optim.SGD(head.parameters(), lr=0.01)
            common = (image_enc, image_fp, pipeline, text_enc, text_fp, head, opt, args.batch_size)
            e1, c1, _ = run_epoch(sites, cache_root, *common)
            e2, c2, h2 = run_epoch(sites, cache_root, *common)
            if c2 != 0:
                raise RuntimeError(f"epoch 2 recomputed {c2} items: the cache did not hold")
            size = sum(f.stat().st_size for f in cache_root.rglob("*") if f.is_file())
            firsts.append(e1)
            seconds.append(e2)
            ratios.append(e1 / e2)
            sizes.append(size)
            print(
                f"repeat {rep}: epoch 1 {e1:.2f} s ({c1} computed), epoch 2 {e2:.3f} s "
                f"({h2} from cache), {e1 / e2:.0f}x",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"Cohort: {len(sites)} sites, {n_pat} patients, {n_img} images (PNG/DICOM), "
        f"{n_txt} patients with notes; task covid_oxygen_24h. Image encoder "
        f"`{args.image_encoder}` (2D, {args.size} px, frozen, pooled features "
        f"{image_enc.output_dim}), text encoder all-MiniLM-L6-v2 (frozen, {text_enc.output_dim}); "
        f"batch {args.batch_size}; {args.threads} torch threads; torch {torch.__version__}, "
        f"Python {platform.python_version()}; median of {args.repeats} repeats.\n"
    )
    print(
        "| epoch 1: compute + write cache (s) | epoch 2: from cache (s) | speed-up (median of "
        "per-repeat ratios) | cache on disk (MB) |"
    )
    print("|---|---|---|---|")
    print(
        f"| {statistics.median(firsts):.2f} | {statistics.median(seconds):.3f} | "
        f"{statistics.median(ratios):.0f}x | {statistics.median(sizes) / 1e6:.2f} |"
    )


if __name__ == "__main__":
    main()
