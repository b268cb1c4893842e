"""Regenerate ``tests/reference/weights/``: ``.venv/bin/python -m tests.reference.make``.

Trains the tiny COVID-19 config with each engine (1 torch thread) and stores every model's
weights as one safetensors file per engine, keys ``<relative model path>::<tensor>``, and the
machine's float probe (``probe.json``: the test pins bit for bit only where it matches).
Prints each file's sha256. ``--hashes`` writes nothing and prints the sha256 of every
``model.safetensors`` the runs wrote (the restructure's before/after check).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.reference.runs import (
    PINNED,
    float_probe,
    model_files,
    run_engine,
    run_weights,
    tiny_inputs,
)

OUT = Path(__file__).resolve().parent / "weights"
#: The float probe of the machine the references were made on (:func:`float_probe`).
PROBE = OUT / "probe.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str]) -> int:
    """Write one reference file per engine (or, with ``--hashes``, print model hashes)."""
    hashes_only = "--hashes" in argv
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sample, bert = tiny_inputs(root)
        for engine in PINNED:
            run_dir = run_engine(engine, root, sample, bert)
            if hashes_only:
                for name, p in model_files(run_dir).items():
                    print(f"{engine} {name} sha256 {_sha256(p)}")
                continue
            weights = run_weights(run_dir)
            flat = {f"{name}::{key}": np.ascontiguousarray(value)
                    for name, state in weights.items() for key, value in state.items()}
            path = OUT / f"{engine}.safetensors"
            save_file(dict(sorted(flat.items())), str(path))
            print(f"{engine}: {len(flat)} tensors, sha256 {_sha256(path)}")
    if not hashes_only:
        import torch

        PROBE.write_text(json.dumps({
            "probe": float_probe(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}, indent=1) + "\n")
        print(f"float probe: {PROBE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
