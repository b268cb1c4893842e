"""Behaviour pinned: each engine's tiny run gives the committed reference weights.

The references are made by ``python -m tests.reference.make``; a change that alters training
on purpose regenerates them in the same commit and says why. Floats are compared with
max |difference| <= 1e-6, so the check holds across machines of one kind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.reference.make import OUT
from tests.reference.runs import PINNED, run_engine, run_weights

TOLERANCE = 1e-6


@pytest.mark.parametrize("engine", PINNED)
def test_engine_reproduces_reference_weights(
    engine: str, tiny_sample: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    reference = load_file(str(OUT / f"{engine}.safetensors"))
    run_dir = run_engine(engine, tmp_path, tiny_sample, tiny_bert)
    got = {f"{name}::{key}": value
           for name, state in run_weights(run_dir).items() for key, value in state.items()}
    assert sorted(got) == sorted(reference), "model files or tensor names changed"
    worst = {key: float(np.max(np.abs(np.asarray(got[key], dtype=np.float64)
                                      - reference[key].astype(np.float64)), initial=0.0))
             for key in reference}
    key = max(worst, key=lambda k: worst[k])
    assert worst[key] <= TOLERANCE, f"{engine}: {key} differs by {worst[key]:.3g}"
