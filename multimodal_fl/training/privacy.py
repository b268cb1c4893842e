"""Differentially private training (DP-SGD) with Opacus: the model, the steps, the accountant.

DP-SGD (Abadi et al. 2016) as Opacus implements it: each step draws a Poisson-sampled batch
(every training row independently with probability ``q``), computes every row's gradient
(Opacus' per-sample gradient hooks), clips each row's gradient to L2 norm ``C``
(``max_grad_norm``) over all trainable parameters, adds Gaussian noise of standard deviation
``sigma * C`` (``noise_multiplier``) to their sum and divides by the expected batch size
``q * n``; the optimiser (AdamW here) takes that noisy mean as its gradient. The accountant
(Opacus' RDP or PRV accountant) composes the steps into an epsilon at a stated delta.

What this module provides:

* :func:`make_private_compatible`: the experiment's model in the form DP-SGD needs. Opacus'
  ``ModuleValidator.fix`` replaces every BatchNorm by a GroupNorm (``gcd(32, channels)``
  groups; in this package's image encoders: the BatchNorm after each convolution of
  ``smallcnn`` / ``tinycnn`` and every BatchNorm of MONAI's ResNets and DenseNet121), every
  in-place activation is made out-of-place, and the fusion model runs dense
  (:class:`~multimodal_fl.fusion.FusionModel` ``dense=True``: every encoder on every row).
  The attention fusion's Transformer layer has no per-sample gradient in Opacus: DP-SGD takes
  ``concat`` and ``late`` fusion.
* :class:`PrivacyLedger`: a site's accountant, saved as JSON and read back, so the epsilon
  spent survives a resumed run and a site process rebuilt per message.
* :class:`DPSGD` and :func:`dp_session`: what :func:`~multimodal_fl.training.train` runs
  when it is given DP settings.

Randomness. The batches' Poisson sampling and the noise must be unknown to whoever sees the
update, or neither the sampling nor the noise protects anyone. Both come from torch
generators seeded with 63 bits of the operating system's CSPRNG (:mod:`secrets`) at every
training call, never from the experiment seed; the noise is drawn as Opacus' ``secure_mode``
draws it (the sum of four Gaussians, against floating-point attacks). Opacus' own
``secure_mode`` also wants ``torchcsprng`` for the generator itself, which has no build for
this torch; a DP run is therefore not reproducible bit for bit, by design.

Opacus is imported inside the functions that use it: the package works without it
(``pip install 'multimodal_fl[dp]'``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multimodal_fl.fusion import FusionModel

__all__ = [
    "ACCOUNTANTS",
    "DPSGD",
    "EPSILON_COVERS",
    "SITE_LEVEL_COVERS",
    "SITE_LEVEL_SECURED_COVERS",
    "PrivacyLedger",
    "dp_session",
    "make_private_compatible",
    "noise_multiplier_for",
    "noise_only_step",
    "poisson_sample_rate",
    "require_opacus",
]

#: Opacus accountants a run may choose.
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")

#: What a site's DP-SGD epsilon covers, in one sentence (``metrics.json`` and the report).
EPSILON_COVERS = (
    "Each site's epsilon (at its delta) covers the training updates it sent, the weights "
    "DP-SGD trained in its fit replies, for one patient of that site; it does not cover the "
    "standardisation moments, PCA summaries or evaluation figures, which the disclosure gate's "
    "small-cell rules handle instead.")
#: What the server's site-level epsilon covers, in one sentence.
SITE_LEVEL_COVERS = (
    "The site-level epsilon covers one hospital's participation in the aggregate model (all of "
    "its patients at once) against anyone who sees the global weights; the server itself sees "
    "each update before the noise, and no patient is protected by it alone.")
#: The same, when secure aggregation is on (each site clipped its own update before masking).
SITE_LEVEL_SECURED_COVERS = (
    "The site-level epsilon covers one hospital's participation in the aggregate model (all of "
    "its patients at once) against anyone who sees the global weights; each site clipped its own "
    "update before secure aggregation, so the server saw only their sum before the noise, never "
    "one hospital's update; no patient is protected by it alone.")

# Warnings Opacus gives on every call that say nothing new here: the generators are seeded
# from the OS's CSPRNG (module docstring), and the first layer's inputs need no gradient.
_QUIET = ("Secure RNG turned off", "Full backward hook is firing")


def require_opacus() -> None:
    """Raise one line when Opacus is not installed.

    Raises
    ------
    ImportError
        Naming the extra that installs it.
    """
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ImportError("privacy.dp and privacy.site_level need Opacus: pip install "
                          "'multimodal_fl[dp]' (opacus==1.6.0)") from None


def make_private_compatible(model: FusionModel, *, per_sample: bool = True
                            ) -> tuple[FusionModel, list[str]]:
    """The model in the form DP-SGD needs, and what changed.

    BatchNorm -> GroupNorm (Opacus' ``ModuleValidator.fix``), in-place activations made
    out-of-place, the fusion model dense. Weights other than the replaced normalisation layers
    are kept (a GroupNorm starts, as a BatchNorm does, at scale 1 and shift 0).

    Parameters
    ----------
    model : FusionModel
        Built with :func:`~multimodal_fl.training.build_model`; not changed.
    per_sample : bool, default True
        Also make it dense and check it with Opacus (DP-SGD). ``False``: only the
        normalisation layers (site-level DP of the aggregate: BatchNorm's running statistics
        are no gradient, so the clipped and noised update cannot cover them).

    Returns
    -------
    model : FusionModel
        A copy, validated by Opacus.
    changes : list of str
        One line per module replaced or changed (e.g. ``"encoders.image.backbone.features.1:
        BatchNorm2d(16) -> GroupNorm(16 groups)"``).

    Raises
    ------
    ValueError
        When the model has a layer Opacus cannot compute per-sample gradients of (the
        attention fusion's Transformer layer), naming the modules.
    """
    require_opacus()
    from opacus.validators import ModuleValidator

    if per_sample and model.kind == "attention":
        raise ValueError("privacy.dp: fusion.kind 'attention' has no per-sample gradients in "
                         "Opacus (its Transformer layer); use fusion.kind concat or late")
    before = dict(model.named_modules())
    fixed = ModuleValidator.fix(model)
    if not isinstance(fixed, FusionModel):  # fix() clones the root: a FusionModel stays one
        raise TypeError(f"ModuleValidator.fix returned {type(fixed).__name__}")
    changes = [f"{name}: {_describe(before[name])} -> {_describe(module)}"
               for name, module in fixed.named_modules()
               if name in before and type(before[name]) is not type(module)]
    for name, module in fixed.named_modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changes.append(f"{name}: {type(module).__name__} in place -> out of place")
    if not per_sample:
        return fixed, changes
    fixed.dense = True
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ValueError("privacy.dp: the model has layers Opacus cannot train privately: "
                         + "; ".join(str(e).split(".")[0] for e in errors[:3]))
    return fixed, changes


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.GroupNorm):
        return f"GroupNorm({module.num_groups} groups)"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"{type(module).__name__}({module.num_features})"
    return type(module).__name__


def poisson_sample_rate(n: int, batch_size: int) -> float:
    """Each row's probability of joining a batch: ``1 / ceil(n / batch_size)``.

    The rate Opacus' ``make_private`` gives a data loader of ``n`` rows and this batch size,
    so the expected batch is about ``batch_size`` rows.

    Parameters
    ----------
    n : int
        Training rows (at least 1).
    batch_size : int

    Returns
    -------
    float
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"poisson_sample_rate: n={n} and batch_size={batch_size} must be >= 1")
    return 1.0 / math.ceil(n / min(batch_size, n))


def noise_multiplier_for(target_epsilon: float, *, delta: float, sample_rate: float,
                         steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier that spends ``target_epsilon`` in ``steps`` steps (Opacus).

    Parameters
    ----------
    target_epsilon : float
    delta : float
    sample_rate : float
        Poisson sampling rate of each step.
    steps : int
        Every step the budget covers (e.g. rounds x local steps).
    accountant : {"rdp", "prv"}

    Returns
    -------
    float
    """
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=int(steps),
                                      accountant=accountant))


@dataclass
class PrivacyLedger:
    """A site's privacy accountant (Opacus) and the training calls it counted.

    Parameters
    ----------
    mechanism : {"rdp", "prv"}
        The Opacus accountant.
    history : list of (noise_multiplier, sample_rate, steps)
        The accountant's state (``IAccountant.state_dict()["history"]``).
    fits : list of dict
        One entry per counted training call (``round``, ``steps``, ``noise_multiplier``,
        ``sample_rate``, ``epsilon``, ``delta``): what the site can show of its spending.
    """

    mechanism: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)
    fits: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Check the mechanism."""
        if self.mechanism not in ACCOUNTANTS:
            raise ValueError(f"privacy accountant {self.mechanism!r}: expected one of "
                             f"{list(ACCOUNTANTS)}")
        self.history = [(float(s), float(q), int(n)) for s, q, n in self.history]

    def accountant(self) -> Any:
        """A fresh Opacus accountant holding this ledger's history (Opacus' ``load_state_dict``).

        Returns
        -------
        opacus.accountants.IAccountant
        """
        require_opacus()
        from opacus.accountants import create_accountant

        acc = create_accountant(self.mechanism)
        if self.history:
            acc.load_state_dict({"history": list(self.history), "mechanism": self.mechanism})
        return acc

    def take(self, accountant: Any) -> None:
        """Adopt an accountant's history after training (its ``state_dict``).

        Parameters
        ----------
        accountant : opacus.accountants.IAccountant
        """
        state = accountant.state_dict()
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step).

        Parameters
        ----------
        delta : float

        Returns
        -------
        float
        """
        if not self.history:
            return 0.0
        return float(self.accountant().get_epsilon(delta=delta))

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float) -> float:
        """Epsilon at ``delta`` were ``steps`` more steps taken (nothing is recorded).

        Parameters
        ----------
        noise_multiplier, sample_rate : float
        steps : int
        delta : float

        Returns
        -------
        float
        """
        if steps <= 0:
            return self.epsilon(delta)
        if noise_multiplier <= 0:
            return math.inf
        after = copy.deepcopy(self)
        after.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        return after.epsilon(delta)

    def to_json(self) -> dict[str, Any]:
        """The ledger as a JSON document.

        Returns
        -------
        dict
        """
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history],
                "fits": self.fits}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger to ``path`` atomically.

        Parameters
        ----------
        path : path-like
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mechanism: str = "rdp") -> PrivacyLedger:
        """The ledger in ``path``, or an empty one of ``mechanism`` when there is none.

        Parameters
        ----------
        path : path-like
        mechanism : {"rdp", "prv"}
            The accountant a new ledger uses; a saved ledger of another accountant is an
            error (its history would be composed by the other's rules).

        Returns
        -------
        PrivacyLedger

        Raises
        ------
        ValueError
            For an unreadable file or one of another accountant (one line naming it).
        """
        path = Path(path)
        if not path.is_file():
            return cls(mechanism)
        try:
            doc = json.loads(path.read_text())
            ledger = cls(str(doc["mechanism"]), [tuple(h) for h in doc["history"]],
                         list(doc.get("fits", [])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a privacy ledger ({type(exc).__name__}: {exc}); "
                             "expected mechanism, history and fits") from None
        if ledger.mechanism != mechanism:
            raise ValueError(f"{path}: the ledger counts with the {ledger.mechanism!r} "
                             f"accountant; privacy.dp.accountant is {mechanism!r}: keep "
                             f"{ledger.mechanism!r} for this run")
        return ledger


@dataclass
class DPSGD:
    """DP-SGD settings of one training call.

    Parameters
    ----------
    noise_multiplier : float
        ``sigma``: the noise's standard deviation over ``max_grad_norm``.
    max_grad_norm : float
        ``C``: every row's gradient is clipped to this L2 norm.
    ledger : PrivacyLedger
        Counts the steps (its history is extended in place when the call ends).
    """

    noise_multiplier: float
    max_grad_norm: float
    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)

    def __post_init__(self) -> None:
        """Check the settings."""
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"DP-SGD noise_multiplier={self.noise_multiplier}: expected > 0")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"DP-SGD max_grad_norm={self.max_grad_norm}: expected > 0")


def _secret_generator(device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded from the OS's CSPRNG (never the run seed)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


class _Rows(torch.utils.data.Dataset[tuple[torch.Tensor]]):
    """Row numbers ``0..n-1`` (one-tuples, as Opacus' Poisson data loader wants items)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (torch.tensor(i, dtype=torch.long),)


def _cycle(loader: Any) -> Iterator[torch.Tensor]:
    """Batches of row numbers from the Poisson loader, epoch after epoch (may be empty)."""
    while True:
        for (rows,) in loader:
            yield torch.as_tensor(rows, dtype=torch.long).reshape(-1)


@contextlib.contextmanager
def dp_session(model: nn.Module, optimizer: torch.optim.Optimizer, n_rows: int,
               batch_size: int, dp: DPSGD, device: torch.device
               ) -> Iterator[tuple[torch.optim.Optimizer, Iterator[torch.Tensor]]]:
    """Make a training call private with Opacus' ``PrivacyEngine.make_private``.

    Per-sample gradient hooks on ``model`` (not wrapped: its state-dict keys stay), a
    ``DPOptimizer`` around ``optimizer`` (clipping, noise, the accountant's step hook), and
    Poisson-sampled batches of row numbers at :func:`poisson_sample_rate`. The hooks are
    removed and the ledger takes the accountant's history when the block ends.

    Parameters
    ----------
    model : nn.Module
        Made by :func:`make_private_compatible`.
    optimizer : torch.optim.Optimizer
        Over ``model``'s trainable parameters.
    n_rows, batch_size : int
        Training rows and the expected batch size.
    dp : DPSGD
    device : torch.device
        Where the model is (the noise generator lives there).

    Yields
    ------
    optimizer : opacus.optimizers.DPOptimizer
    batches : iterator of Tensor
        Row numbers of each step's batch (an empty one now and then).
    """
    require_opacus()
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{message}")
        engine = PrivacyEngine(accountant=dp.ledger.mechanism)
        engine.accountant = dp.ledger.accountant()
        loader = torch.utils.data.DataLoader(_Rows(n_rows), batch_size=min(batch_size, n_rows),
                                             generator=_secret_generator(torch.device("cpu")))
        hooks, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True, noise_generator=_secret_generator(device), wrap_model=False)
        dp_opt.secure_mode = True  # four Gaussians per draw (Opacus' floating-point defence)
        try:
            yield dp_opt, _cycle(dp_loader)
        finally:
            hooks.cleanup()
            dp.ledger.take(engine.accountant)


def noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """The step of an empty Poisson batch: no gradient, the noise alone (and it is counted).

    Parameters
    ----------
    optimizer : opacus.optimizers.DPOptimizer
    """
    params = getattr(optimizer, "params", [])
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
