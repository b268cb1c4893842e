"""Checkpoints and resume: atomic files, stop-after-round k then resume, and a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from toy import initial_weights, toy_config, toy_federation

from multimodal_fl.federated.checkpoint import (
    CHECKPOINT_JSON,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from multimodal_fl.federated.server import FederatedResult, RoundRecord, run_federated

torch.set_num_threads(1)
HERE = Path(__file__).parent
ROUNDS = 4


def _same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs"


def _same_history(a: list[RoundRecord], b: list[RoundRecord]) -> None:
    assert [r.deterministic() for r in a] == [r.deterministic() for r in b]


def _uninterrupted(**overrides: object) -> FederatedResult:
    state = overrides.pop("state_dir", None)
    fed = toy_federation(state_dir=state if isinstance(state, Path) else None)
    return run_federated(fed, initial_weights(0), toy_config(ROUNDS, **overrides))


def test_checkpoint_round_trip_keeps_dtypes_and_scalars(tmp_path: Path) -> None:
    weights: dict[str, np.ndarray] = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "count": np.array(7, dtype=np.int64),
        "flag": np.array([True, False]),
    }
    state = {"m/w": np.full((2, 3), 0.5)}
    save_checkpoint(tmp_path, Checkpoint(3, weights, state, {"history": [1, 2]}))
    back = load_checkpoint(tmp_path)
    assert back is not None and back.round == 3 and back.meta == {"history": [1, 2]}
    _same_bits(back.weights, weights)
    _same_bits(back.optimizer_state, state)


def test_checkpoint_keeps_two_files_and_detects_corruption(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    for rnd in range(1, 5):
        save_checkpoint(tmp_path, Checkpoint(rnd, {"w": np.full(2, rnd, dtype=np.float32)}))
    files = sorted(p.name for p in tmp_path.glob("round_*.safetensors"))
    assert files == ["round_00003.safetensors", "round_00004.safetensors"]
    (tmp_path / ".round_00005.safetensors.abc.tmp").write_bytes(b"half a file")  # a killed write
    back = load_checkpoint(tmp_path)
    assert back is not None and back.round == 4
    (tmp_path / "round_00004.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_JSON).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("fedbn", [False, True])
def test_stop_after_round_then_resume_is_bit_identical(tmp_path: Path, fedbn: bool) -> None:
    full = _uninterrupted(fedbn=fedbn, state_dir=tmp_path / "full_sites")
    ckpt, sites = tmp_path / "ckpt", tmp_path / "sites"
    first = run_federated(
        toy_federation(state_dir=sites),
        initial_weights(0),
        toy_config(ROUNDS, fedbn=fedbn),
        checkpoint_dir=ckpt,
        stop_after_round=2,
    )
    assert first.completed_rounds == 2 and len(first.history) == 2
    # a fresh process would build fresh sites: only the checkpoint and each site's folder carry over
    resumed = run_federated(
        toy_federation(state_dir=sites),
        initial_weights(0),
        toy_config(ROUNDS, fedbn=fedbn),
        checkpoint_dir=ckpt,
        resume=True,
    )
    assert resumed.completed_rounds == ROUNDS
    _same_bits(resumed.weights, full.weights)
    _same_bits(resumed.optimizer_state, full.optimizer_state)
    assert resumed.optimizer_state  # FedAdam: there is state to carry
    _same_history(resumed.history, full.history)
    assert resumed.site_sizes == full.site_sizes
    record = json.loads((ckpt / CHECKPOINT_JSON).read_text())
    assert record["round"] == ROUNDS and len(record["meta"]["history"]) == ROUNDS
    assert record["meta"]["history"][0] == asdict(first.history[0])


def test_resume_without_checkpoint_starts_at_round_one(tmp_path: Path) -> None:
    result = run_federated(
        toy_federation(), initial_weights(0), toy_config(2), checkpoint_dir=tmp_path, resume=True
    )
    _same_bits(result.weights, _uninterrupted_rounds(2).weights)


def _uninterrupted_rounds(rounds: int) -> FederatedResult:
    return run_federated(toy_federation(), initial_weights(0), toy_config(rounds))


def test_sigkill_mid_round_then_resume_is_bit_identical(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "run_toy.py"), str(ckpt), str(ROUNDS), "0.25"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    killed_after = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            found = load_checkpoint(ckpt) if (ckpt / CHECKPOINT_JSON).exists() else None
            if found is not None and found.round >= 1:
                time.sleep(0.3)  # into the next round: sites are training (0.25 s each)
                os.kill(proc.pid, signal.SIGKILL)
                killed_after = found.round
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_after is None:
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert killed_after is not None, (
        f"no round-1 checkpoint appeared; stderr: {err.decode()[-2000:]}"
    )
    assert proc.returncode == -signal.SIGKILL
    on_disk = load_checkpoint(ckpt)
    assert on_disk is not None and 1 <= on_disk.round < ROUNDS, "the kill did not land mid-run"
    resumed = run_federated(
        toy_federation(), initial_weights(0), toy_config(ROUNDS), checkpoint_dir=ckpt, resume=True
    )
    full = _uninterrupted()
    _same_bits(resumed.weights, full.weights)
    _same_bits(resumed.optimizer_state, full.optimizer_state)
    _same_history(resumed.history, full.history)


class _Killed(BaseException):
    """Stands in for a SIGKILL between two file writes."""


def test_crash_between_weights_and_record_keeps_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import multimodal_fl.federated.checkpoint as ck

    real = ck._atomic_write

    def dying(path: Path, data: bytes) -> None:
        if path.name == CHECKPOINT_JSON and json.loads(data)["round"] == 2:
            (path.parent / f".{path.name}.torn.tmp").write_bytes(data[:10])  # a half-written temp
            raise _Killed
        real(path, data)

    monkeypatch.setattr(ck, "_atomic_write", dying)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Killed):
        run_federated(toy_federation(), initial_weights(0), toy_config(ROUNDS), checkpoint_dir=ckpt)
    monkeypatch.setattr(ck, "_atomic_write", real)
    last = load_checkpoint(ckpt)
    assert last is not None and last.round == 1  # round 2's weights file exists but is not named
    assert (ckpt / "round_00002.safetensors").exists()
    resumed = run_federated(
        toy_federation(), initial_weights(0), toy_config(ROUNDS), checkpoint_dir=ckpt, resume=True
    )
    full = _uninterrupted()
    _same_bits(resumed.weights, full.weights)
    _same_history(resumed.history, full.history)


def test_a_checkpoint_with_planned_steps_of_a_fixed_noise_run_still_resumes() -> None:
    """Checkpoints written before a fixed noise multiplier's fit config dropped its (unused)
    planned steps carry them; resuming such a run for more rounds is not refused for them, while
    a target epsilon's planned steps still must match."""
    from multimodal_fl.federated.server import RunConfig, check_resumable

    fixed = {"dp_noise_multiplier": 1.0, "dp_target_epsilon": 0.0, "local_steps": 3}
    now = RunConfig(rounds=5, fit_config={**fixed, "dp_planned_steps": 0})
    old = {**now.to_json(), "rounds": 2, "fit_config": {**fixed, "dp_planned_steps": 6}}
    check_resumable(Checkpoint(1, {}, meta={"config": old}), now, "ckpt")

    target = {"dp_noise_multiplier": 0.0, "dp_target_epsilon": 3.0, "local_steps": 3}
    now = RunConfig(rounds=5, fit_config={**target, "dp_planned_steps": 15})
    old = {**now.to_json(), "rounds": 2, "fit_config": {**target, "dp_planned_steps": 6}}
    with pytest.raises(CheckpointError, match="fit_config"):
        check_resumable(Checkpoint(1, {}, meta={"config": old}), now, "ckpt")
