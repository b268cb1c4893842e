"""Train the tiny reference runs of every engine (shared by the script and the test)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.numpy import load_file

from multimodal_fl.config import load_config
from multimodal_fl.engines import ENGINES, run
from multimodal_fl.sample_data import generate
from tests.conftest import write_tiny_config
from tests.encoders.conftest import make_tiny_text_model

#: The engines whose weights are pinned (Flower's equal the in-process ones: tested apart).
PINNED = ("inprocess", "local", "centralized")

StateDict = dict[str, "object"]


def tiny_inputs(root: Path) -> tuple[Path, Path]:
    """Write the tiny sample cohort (seed 0) and the tiny random BERT under ``root``."""
    sample = root / "sample"
    generate(sample, seed=0, profile="tiny")
    return sample, make_tiny_text_model(root / "bert")


def run_engine(engine: str, root: Path, sample: Path, bert: Path) -> Path:
    """Train the tiny COVID-19 config with one engine; return its run directory."""
    folder = root / f"cfg-{engine}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_tiny_config(folder, sample, bert))
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {sorted(ENGINES)}")
    # the weights are what is pinned: the run's report is not needed here
    return run(cfg, engine, out_dir=root / f"run-{engine}", report=False).run_dir


def model_files(run_dir: Path) -> dict[str, Path]:
    """Every ``model.safetensors`` of a run, keyed by its path relative to the run directory."""
    return {
        str(p.relative_to(run_dir)): p for p in sorted(run_dir.rglob("model.safetensors"))
    }


def run_weights(run_dir: Path) -> dict[str, dict[str, object]]:
    """The weights of every model file of a run, by relative path."""
    return {name: dict(load_file(str(p))) for name, p in model_files(run_dir).items()}


def float_probe() -> str:
    """A fingerprint of this machine's float path for the kernels the tiny runs use.

    One thread, a fixed seed: a 2D and a 3D convolutional encoder (the runs' image encoders'
    layers, through oneDNN) and a linear layer, forward and backward; the sha256 of the
    outputs' and gradients' bytes. Two machines with the same probe compute the tiny runs bit
    for bit alike (the reference test's tight tolerance); another CPU's kernels round
    differently (float sums in another order), which the probe shows without training.
    """
    from multimodal_fl.encoders.image import SmallCNN

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        parts = []
        for dims, shape in ((2, (8, 1, 32, 32)), (3, (4, 1, 16, 16, 16))):
            net = SmallCNN(dims, 1, channels=(8, 16, 32))
            head = torch.nn.Linear(net.out_features, 3)
            out = head(net(torch.randn(*shape, generator=gen)))
            out.square().sum().backward()
            parts += [out.detach(), *(p.grad for p in (*net.parameters(), *head.parameters())
                                      if p.grad is not None)]
        digest = hashlib.sha256()
        for t in parts:
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()
    finally:
        torch.set_num_threads(threads)
