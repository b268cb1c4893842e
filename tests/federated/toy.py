"""A toy torch site for the federated engine's tests: a tiny MLP with BatchNorm on synthetic data.

Site optimiser rule (the same one the real site follows): the site optimiser (SGD with momentum)
is created afresh at every fit request, so no optimiser state crosses rounds and none needs
checkpointing. All randomness comes from ``torch.Generator`` objects seeded by
``site_seed(seed, site, round)``; the global torch RNG is never used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from multimodal_fl.federated.aggregation import ServerOptimizer
from multimodal_fl.federated.inprocess import InProcessFederation
from multimodal_fl.federated.protocol import Reply, Request, site_seed
from multimodal_fl.federated.proximal import proximal_term
from multimodal_fl.federated.secure_sum import SecureSumParty
from multimodal_fl.federated.secure_update import SecureAggregation, hold_update
from multimodal_fl.federated.server import RunConfig

N_FEATURES = 4
HIDDEN = 8
BATCH = 16
FAULTS = ("raise", "nan", "shape", "missing", "extra", "dtype", "negative", "groups", "identity")


class ToyNet(nn.Module):
    """``encoder`` (Linear, BatchNorm1d, ReLU) then ``head`` (Linear): keys in two groups."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(N_FEATURES, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU()
        )
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch,)."""
        return self.head(self.encoder(x)).squeeze(-1)


def bn_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the normalisation layers (FedBN's local keys)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            out += [f"{name}.{k}" for k in module.state_dict()]
    return sorted(out)


def initial_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Initial global state dict drawn from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    model = ToyNet()
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return to_numpy(model.state_dict())


def to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """State dict -> numpy copies."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def to_torch(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Numpy state dict -> torch tensors (copies)."""
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}


def make_data(name: str, data_seed: int, n: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's synthetic data: Gaussian features, a noisy linear label rule."""
    g = torch.Generator().manual_seed(site_seed(data_seed, "data:" + name, 0))
    x = torch.randn(n, N_FEATURES, generator=g) + shift
    w = torch.tensor([1.0, -2.0, 0.5, 1.5])
    noise = torch.randn(n, generator=g) * 0.5
    y = ((x @ w + noise) > shift).float()
    return x, y


def train_steps(
    model: ToyNet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    generator: torch.Generator,
    mu: float = 0.0,
    train_encoder: bool = True,
) -> float:
    """Local training: a fresh SGD (momentum 0.9) for ``steps`` minibatch steps; mean loss."""
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    if not train_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        model.encoder.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    if not train_encoder:
        model.encoder.eval()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(x), (BATCH,), generator=generator)
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
        total = loss + proximal_term(model.named_parameters(), start, mu)
        total.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else 0.0


class ToySite:
    """A :class:`multimodal_fl.federated.server.Site` for tests, with optional injected faults.

    Parameters
    ----------
    name : str
        Site name.
    n : int
        Training-set size.
    data_seed : int
        Seed of the synthetic data (with the name).
    shift : float
        Feature shift (site heterogeneity).
    train_encoder : bool
        False: the site freezes the encoder and reports ``group_counts={"encoder.": 0}``
        (a site without that modality).
    fault : str or None
        One of ``FAULTS``, injected in ``fault_rounds``.
    fault_rounds : set[int] or None
        Rounds with the fault (None: every round).
    sleep : float
        Seconds to sleep in each fit (timeouts; killing mid-round).
    state_dir : Path or None
        Where FedBN local state is kept per round (else in memory).
    name_data_as : str or None
        Make this site an exact clone of the site of that name (data and random draws).
    """

    def __init__(
        self,
        name: str,
        *,
        n: int = 64,
        data_seed: int = 0,
        shift: float = 0.0,
        train_encoder: bool = True,
        fault: str | None = None,
        fault_rounds: set[int] | None = None,
        sleep: float = 0.0,
        state_dir: Path | None = None,
        name_data_as: str | None = None,
    ) -> None:
        self.name = name
        # a clone of another site (same data, same random draws) when name_data_as is given
        self.seed_name = name_data_as or name
        self.n = n
        self.x, self.y = make_data(name_data_as or name, data_seed, n, shift)
        self.xv, self.yv = make_data("val:" + (name_data_as or name), data_seed, n, shift)
        self.train_encoder = train_encoder
        self.fault = fault
        self.fault_rounds = fault_rounds
        self.sleep = sleep
        self.state_dir = state_dir
        self._local: dict[int, dict[str, np.ndarray]] = {}
        self.calls: list[tuple[str, int]] = []
        self.party = SecureSumParty(name)  # secured rounds: the update waits here

    def export_state(self) -> dict[str, np.ndarray]:
        """The secure-sum state (a site rebuilt for every message keeps it between steps)."""
        return self.party.export_state()

    def restore_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Take back what :meth:`export_state` gave."""
        self.party.restore_state(arrays)

    # FedBN local state, kept per round so a resumed server finds the matching one.
    def _save_local(self, rnd: int, state: dict[str, np.ndarray]) -> None:
        if self.state_dir is None:
            self._local[rnd] = state
            return
        folder = self.state_dir / self.name
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".local_{rnd:05d}.tmp"
        save_file({k: np.asarray(v, order="C") for k, v in state.items()}, str(tmp))
        os.replace(tmp, folder / f"local_{rnd:05d}.safetensors")

    def _load_local(self, before: int) -> dict[str, np.ndarray] | None:
        if self.state_dir is None:
            rounds = [r for r in self._local if r < before]
            return self._local[max(rounds)] if rounds else None
        folder = self.state_dir / self.name
        files = sorted(folder.glob("local_*.safetensors")) if folder.is_dir() else []
        files = [f for f in files if int(f.stem.split("_")[1]) < before]
        return load_file(str(files[-1])) if files else None

    def _model(self, request: Request, *, upto: int) -> ToyNet:
        model = ToyNet()
        state = dict(request.weights)
        if request.config.get("fedbn"):
            local = self._load_local(upto)
            if local is not None:
                state.update(local)
        model.load_state_dict(to_torch(state), strict=True)
        return model

    def handle(self, request: Request) -> Reply:
        """Answer info / fit / evaluate requests."""
        self.calls.append((request.kind, request.round))
        if request.kind == "info":
            return Reply(self.name, "info", request.round, n_samples=self.n)
        if request.kind == "evaluate":
            model = self._model(request, upto=request.round + 1)
            model.eval()
            with torch.no_grad():
                logits = model(self.xv)
                loss = nn.functional.binary_cross_entropy_with_logits(logits, self.yv)
                acc = ((logits > 0).float() == self.yv).float().mean()
            return Reply(
                self.name,
                "evaluate",
                request.round,
                n_samples=len(self.yv),
                metrics={"loss": float(loss), "accuracy": float(acc)},
            )
        if request.kind == "secure_sum":
            return self.party.answer(request)
        if request.kind != "fit":
            raise ValueError(f"ToySite does not handle {request.kind!r} requests")
        faulty = self.fault is not None and (
            self.fault_rounds is None or request.round in self.fault_rounds
        )
        if faulty and self.fault == "raise":
            raise RuntimeError(f"{self.name} crashed on purpose")
        if self.sleep:
            time.sleep(self.sleep)
        model = self._model(request, upto=request.round)
        g = torch.Generator().manual_seed(
            site_seed(int(request.config["seed"]), self.seed_name, request.round)
        )
        train_loss = train_steps(
            model,
            self.x,
            self.y,
            steps=int(request.config.get("local_steps", 5)),
            lr=float(request.config.get("lr", 0.1)),
            generator=g,
            mu=float(request.config.get("proximal_mu", 0.0)),
            train_encoder=self.train_encoder,
        )
        weights = to_numpy(model.state_dict())
        local_keys: list[str] = []
        if request.config.get("fedbn"):
            local_keys = bn_keys(model)
            self._save_local(request.round, {k: weights[k] for k in local_keys})
            for k in local_keys:
                del weights[k]
        reply = Reply(
            self.name,
            "fit",
            request.round,
            weights=weights,
            n_samples=self.n,
            group_counts={} if self.train_encoder else {"encoder.": 0},
            metrics={"loss": train_loss},
            local_keys=local_keys,
        )
        if faulty:
            _inject(reply, self.fault or "")
        secure = SecureAggregation.from_request(request)
        return reply if secure is None else hold_update(self.party, reply, request, secure)


def _inject(reply: Reply, fault: str) -> None:
    key = "head.weight"
    if fault == "nan":
        reply.weights[key] = reply.weights[key].copy()
        reply.weights[key][0, 0] = np.nan
    elif fault == "shape":
        reply.weights[key] = np.zeros((2, HIDDEN), dtype=np.float32)
    elif fault == "missing":
        del reply.weights[key]
    elif fault == "extra":
        reply.weights["head.extra"] = np.zeros(1, dtype=np.float32)
    elif fault == "dtype":
        reply.weights[key] = reply.weights[key].astype(np.float64)
    elif fault == "negative":
        reply.n_samples = -3
    elif fault == "groups":
        reply.group_counts = {"encoder.": reply.n_samples + 1}
    elif fault == "identity":
        reply.site = "someone_else"
    else:
        raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")


def toy_federation(
    names: tuple[str, ...] = ("a", "b", "c"), *, sleep: float = 0.0, state_dir: Path | None = None
) -> InProcessFederation:
    """Three heterogeneous toy sites of different sizes."""
    sites = {
        name: ToySite(name, n=32 + 16 * i, shift=0.3 * i, sleep=sleep, state_dir=state_dir)
        for i, name in enumerate(names)
    }
    return InProcessFederation(sites)


def toy_config(rounds: int = 4, **overrides: object) -> RunConfig:
    """The run config the resume tests and ``run_toy.py`` share."""
    base: dict[str, object] = {
        "rounds": rounds,
        "optimizer": ServerOptimizer("fedadam", eta=0.05),
        "min_sites": 2,
        "fraction": 1.0,
        "seed": 7,
        "fit_config": {"local_steps": 4, "lr": 0.1},
    }
    base.update(overrides)
    return RunConfig(**base)  # type: ignore[arg-type]
