"""Run the toy federation with checkpoints (the subprocess the SIGKILL resume test kills).

Usage: python tests/federated/run_toy.py CHECKPOINT_DIR ROUNDS SLEEP_SECONDS
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from toy import initial_weights, toy_config, toy_federation

from multimodal_fl.federated.server import run_federated


def main(argv: list[str]) -> None:
    """Run ``ROUNDS`` rounds into ``CHECKPOINT_DIR``, each site sleeping ``SLEEP_SECONDS``."""
    torch.set_num_threads(1)
    ckpt, rounds, sleep = Path(argv[0]), int(argv[1]), float(argv[2])
    federation = toy_federation(sleep=sleep)
    run_federated(federation, initial_weights(0), toy_config(rounds), checkpoint_dir=ckpt)
    print("finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
