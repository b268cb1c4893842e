"""The training loop: :func:`train` on one dataset, :func:`local_update` for a federated site.

:func:`train` runs a number of optimisation steps (AdamW, fresh every call), sampling batches
from a caller-seeded ``torch.Generator``, with ``pos_weight`` from the training labels,
validation-AUC early stopping (:class:`EarlyStopping`) and an optional proximal (FedProx)
term. :func:`local_update` is the federated site's entry point: load weights, run ``steps``.

Determinism
-----------
All randomness of a :func:`train` call (batch order, dropout, modality dropout, augmentation)
derives from its ``generator``: the global torch RNG is forked and seeded from it for the
duration of the call, then restored. On CPU the same generator seed and the same starting
weights give bit-identical weights. :func:`torch_threads` holds the torch thread count
fixed for a block (every engine uses it, so their results agree bit for bit).

Optimiser state
---------------
Every :func:`train` / :func:`local_update` call creates a new AdamW optimiser. By default the
federated optimiser state is therefore reset at every round: nothing but the weights crosses
rounds, so there is no optimiser state to checkpoint or to average. With
``federated.keep_optimizer_state`` a site passes the same ``optimizer_state`` holder to every
call: each call starts from the moments in it and leaves its own there; they never leave the site.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from multimodal_fl.fusion import FusionModel
from multimodal_fl.training.dataset import Batch, CohortDataset
from multimodal_fl.training.inference import evaluate
from multimodal_fl.training.model import load_weights, resolve_device
from multimodal_fl.training.privacy import DPSGD, dp_session, noise_only_step
from multimodal_fl.training.warmup import fit_linear_path

if TYPE_CHECKING:
    from multimodal_fl.config import TrainingConfig

__all__ = [
    "EarlyStopping",
    "ProximalFn",
    "TrainResult",
    "local_update",
    "torch_threads",
    "train",
]

#: A proximal hook: ``proximal(model) -> scalar tensor`` added to the loss (FedProx).
ProximalFn = Callable[[nn.Module], torch.Tensor]


@dataclass
class TrainResult:
    """What a :func:`train` call did.

    Attributes
    ----------
    steps : int
        Optimisation steps run in this call.
    last_step : int
        ``start_step + steps``: the global step count after the call.
    loss : float
        Mean training loss (without the proximal term) over the steps of this call.
    history : list of dict
        One entry per validation: ``step``, ``train_loss`` (mean since the last entry),
        ``val_auc`` (float or None) and ``val_auc_reason`` (why it is None).
    best_step : int or None
        Step whose weights were kept by early stopping (None: final weights kept).
    best_val_auc : float or None
        Validation AUC at ``best_step``.
    stopped_early : bool
        Whether patience ran out before ``steps``.
    n_samples : int
        Training patients.
    modality_counts : dict of str to int
        Training patients with each modality present.
    pos_weight : float
        The positive-class weight used in the loss (negatives / positives).
    notes : list of str
        Human-readable remarks (e.g. "validation AUC undefined (no positives): early
        stopping off").
    warmup_steps : int
        Steps that fitted the linear path alone before ``steps`` (not counted in them).
    warmup_loss : float
        Mean training loss of those steps, or the training loss of the fitted path
        (``warmup_fit``; NaN when neither).
    warmup_fit_C : float or None
        The inverse L2 penalty the fitted warm-up chose (None: no fit).
    """

    steps: int
    last_step: int
    loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_val_auc: float | None = None
    stopped_early: bool = False
    n_samples: int = 0
    modality_counts: dict[str, int] = field(default_factory=dict)
    pos_weight: float = 1.0
    notes: list[str] = field(default_factory=list)
    warmup_steps: int = 0
    warmup_loss: float = float("nan")
    warmup_fit_C: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "steps": self.steps,
            "last_step": self.last_step,
            "loss": self.loss,
            "history": self.history,
            "best_step": self.best_step,
            "best_val_auc": self.best_val_auc,
            "stopped_early": self.stopped_early,
            "n_samples": self.n_samples,
            "modality_counts": self.modality_counts,
            "pos_weight": self.pos_weight,
            "notes": self.notes,
            "warmup_steps": self.warmup_steps,
            "warmup_loss": self.warmup_loss,
            "warmup_fit_C": self.warmup_fit_C,
        }


class EarlyStopping:
    """Validation-AUC early stopping: keep the best weights, stop when they stop improving.

    An undefined validation AUC turns early stopping off for the rest of the run (the final
    weights are kept then); later evaluations are still recorded.

    Parameters
    ----------
    patience : int
        Evaluations without improvement after which to stop (0: never stop early).

    Attributes
    ----------
    enabled : bool
        False once a validation AUC was undefined.
    best_value : float
        Best validation AUC so far (``-inf`` before the first).
    best_step : int or None
        Step of ``best_value``.
    best_state : dict of str to Tensor or None
        A copy of the model's state dict at ``best_step``.
    bad_evals : int
        Evaluations since the last improvement.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.enabled = True
        self.best_value = -math.inf
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0

    def update(self, step: int, value: float | None, model: nn.Module) -> bool:
        """Record the validation AUC at ``step``; return whether to stop now.

        Parameters
        ----------
        step : int
            Global step of the evaluation.
        value : float or None
            Validation AUC (``None``: undefined, which turns early stopping off).
        model : nn.Module
            Its weights are copied when ``value`` is the best so far.

        Returns
        -------
        bool
            True when early stopping is on and ``patience`` evaluations in a row did not
            improve on the best.
        """
        if value is None:
            self.enabled = False
            return False
        if value > self.best_value:
            self.best_value = value
            self.bad_evals = 0
            self.best_step = step
            self.best_state = copy.deepcopy(model.state_dict())
            return False
        self.bad_evals += 1
        return self.enabled and self.patience > 0 and self.bad_evals >= self.patience

    def restore_best(self, model: nn.Module) -> bool:
        """Load the best weights into ``model`` when early stopping stayed on and has some.

        Parameters
        ----------
        model : nn.Module

        Returns
        -------
        bool
            Whether the best weights were loaded (False: the final weights are kept).
        """
        if not self.enabled or self.best_state is None:
            return False
        model.load_state_dict(self.best_state)
        return True


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(n)``; the previous count is restored after.

    Every engine runs under the config's ``training.num_threads``: float sums then split
    the same way, and results agree bit for bit across engines.

    Parameters
    ----------
    n : int or None
        Torch threads for the block; ``None`` leaves the thread count as it is.

    Yields
    ------
    None
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _generator_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def _batch_stream(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of row indices: successive random permutations, cut into batches."""
    buf = torch.empty(0, dtype=torch.long)
    size = min(batch_size, n)
    while True:
        while buf.numel() < size:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:size]
        buf = buf[size:]


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn)


def _cuda_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG a call on ``device`` forks (none on CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _pos_weight(labels: torch.Tensor) -> tuple[float, list[str]]:
    """Negatives / positives of the training labels (1 when a class is absent, with a note)."""
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return 1.0, [f"training set has {n_pos} positives and {n_neg} negatives: pos_weight=1"]
    return n_neg / n_pos, []


def batch_size_for(labels: torch.Tensor, batch_size: int, min_rare: float
                   ) -> tuple[int, list[str]]:
    """The batch size of one training set: ``batch_size``, enlarged for a scarce class.

    With ``min_rare > 0`` the batch holds ``min_rare`` patients of the training set's rarer
    class on average: ``ceil(min_rare * n / n_rare)`` when that is larger than ``batch_size``,
    never more than ``n`` (a training set of at most ``batch_size`` rows is left as it is). A
    fresh AdamW (every :func:`train` call, so every federated round) takes sign-like steps at
    first, and on batches of 32 of an outcome at 1 % most steps see no positive at all: the
    local updates then pull the model around instead of fitting it (``docs/configuration.md``
    has the measurement). Decided where the rows are, so no one else learns the prevalence from
    it.

    Parameters
    ----------
    labels : torch.Tensor
        The training labels (0/1).
    batch_size : int
        ``training.batch_size``.
    min_rare : float
        ``training.min_rare_per_batch`` (0: off).

    Returns
    -------
    size : int
    notes : list of str
        One line when the batch was enlarged, or when it is off and a batch holds fewer than
        one of the rarer class on average (kept with the site's own training result: they
        name class counts, so they go to the site's log, never into a reply).
    """
    n = len(labels)
    n_pos = int(labels.sum())
    n_rare = min(n_pos, n - n_pos)
    if n_rare == 0:
        return batch_size, []
    if min_rare <= 0:
        per_batch = min(batch_size, n) * n_rare / n
        if per_batch >= 1:
            return batch_size, []
        return batch_size, [f"batches of {batch_size} hold {per_batch:.2f} of the rarer class on "
                            "average, which a fresh optimiser every round trains on badly; see "
                            "docs/configuration.md, rare outcomes (training.min_rare_per_batch, "
                            "federated.keep_optimizer_state)"]
    wanted = math.ceil(min_rare * n / n_rare)
    if wanted <= batch_size or n <= batch_size:
        return batch_size, []
    size = min(n, wanted)
    return size, [f"batch size {size} instead of {batch_size}: {n_rare} of {n} training rows "
                  f"are of the rarer class (training.min_rare_per_batch {min_rare:g})"]


def _optimisation_step(
    model: FusionModel,
    batch: Batch,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    proximal: ProximalFn | None,
) -> float:
    """One optimiser step on ``batch``; returns its loss (without the proximal term).

    The proximal term's gradient is applied only to parameters the batch's loss reached.
    """
    logits = model(batch.inputs, batch.mask, patient_ids=batch.patient_ids)
    loss = loss_fn(logits, batch.labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if proximal is not None:
        untouched = [p for p in params if p.grad is None]
        proximal(model).backward()
        for p in untouched:
            p.grad = None
    opt.step()
    return float(loss.detach())


def _validate(
    model: FusionModel,
    val_data: CohortDataset,
    device: torch.device,
    *,
    step: int,
    train_loss: float,
    result: TrainResult,
    stopper: EarlyStopping,
) -> bool:
    """Validation AUC at ``step`` into ``result.history`` and ``stopper``; True to stop."""
    auc = evaluate(model, val_data, device=device, metrics=("auc",))["auc"]
    entry: dict[str, Any] = {
        "step": step,
        "train_loss": train_loss,
        "val_auc": auc.value,
        "val_auc_reason": auc.reason,
    }
    result.history.append(entry)
    if auc.value is None and stopper.enabled:
        result.notes.append(
            f"validation AUC undefined ({auc.reason}): early stopping off, final weights kept"
        )
    return stopper.update(step, auc.value, model)


class _Loop:
    """The steps of one :func:`train` call and their running losses."""

    def __init__(self, model: FusionModel, data: CohortDataset, loss_fn: nn.Module,
                 opt: torch.optim.Optimizer, params: list[nn.Parameter], device: torch.device,
                 proximal: ProximalFn | None, augment: Callable[[Batch], Batch] | None) -> None:
        self.model, self.data, self.loss_fn, self.opt = model, data, loss_fn, opt
        self.params, self.device, self.proximal, self.augment = params, device, proximal, augment
        self.total, self.n = 0.0, 0
        self.window, self.window_n = 0.0, 0

    def step(self, rows: torch.Tensor) -> float:
        """One optimiser step on the batch of ``rows``; its loss (NaN for an empty batch)."""
        self.model.train()
        if rows.numel() == 0:  # an empty Poisson batch (DP-SGD): the noise alone
            noise_only_step(self.opt)
            return float("nan")
        batch = self.data.batch(rows)
        if self.augment is not None:
            batch = self.augment(batch)
        value = _optimisation_step(self.model, batch.to(self.device), self.loss_fn, self.opt,
                                   self.params, self.proximal)
        self.total += value
        self.window += value
        self.n += 1
        self.window_n += 1
        return value

    def window_mean(self) -> float:
        """Mean loss since the last call (NaN when no batch had rows)."""
        mean = self.window / self.window_n if self.window_n else float("nan")
        self.window, self.window_n = 0.0, 0
        return mean

    def mean(self) -> float:
        """Mean loss of the call's non-empty batches (NaN when none)."""
        return self.total / self.n if self.n else float("nan")


def train(
    model: FusionModel,
    train_data: CohortDataset,
    val_data: CohortDataset | None,
    cfg: TrainingConfig,
    *,
    steps: int | None = None,
    generator: torch.Generator,
    start_step: int = 0,
    proximal: ProximalFn | None = None,
    augment: Callable[[Batch], Batch] | None = None,
    progress: Callable[[int, float], None] | None = None,
    dp: DPSGD | None = None,
    optimizer_state: MutableMapping[int, dict[str, torch.Tensor]] | None = None,
    warmup_steps: int = 0,
    warmup_fit: bool = False,
) -> TrainResult:
    """Run ``steps`` optimisation steps of AdamW on ``train_data``, in place.

    The optimiser takes :meth:`FusionModel.optimizer_param_groups` (an encoder's linear path
    at ``cfg.lr`` times its ``linear_lr_scale``, everything else at ``cfg.lr``).

    Batches of ``cfg.batch_size`` rows (enlarged for a scarce class by :func:`batch_size_for`
    when ``cfg.min_rare_per_batch`` is set) are drawn without replacement from successive random
    permutations of the training rows (cycling through the data as often as ``steps`` needs).
    The loss is ``BCEWithLogits`` with ``pos_weight`` = negatives / positives of the training
    rows. Every ``cfg.eval_every`` steps the validation AUC is computed; when it does not
    improve for ``cfg.patience`` evaluations, training stops and the best weights are restored.
    When the validation AUC is undefined (no positives or no negatives in ``val_data``), that is
    recorded in ``notes`` and early stopping is off.

    Parameters
    ----------
    model : FusionModel
        Trained in place (moved to ``cfg.device``).
    train_data : CohortDataset
        Training rows (at least one).
    val_data : CohortDataset or None
        Validation rows; ``None`` (or empty) disables validation and early stopping.
    cfg : TrainingConfig
        ``batch_size``, ``lr``, ``weight_decay``, ``eval_every``, ``patience``, ``device``.
    steps : int or None
        Steps to run; default ``cfg.steps``.
    generator : torch.Generator
        The only source of randomness (batch order; dropout and augmentation through a
        forked global RNG seeded from it). Seed it, e.g. from (seed, site, round).
    start_step : int, default 0
        Global step count before this call (for step numbers in ``history``).
    proximal : callable or None
        ``proximal(model) -> scalar`` added to the loss (FedProx). Its gradient is applied
        only to parameters the batch's loss reached, so parameters of a modality absent
        from a batch stay untouched (as without the term).
    augment : callable or None
        ``augment(batch) -> batch`` applied to training batches (e.g. image augmentation).
    progress : callable or None
        ``progress(step, loss)`` called after every step (e.g. to advance a progress bar).
    dp : DPSGD or None
        Train with DP-SGD (:mod:`multimodal_fl.training.privacy`): Poisson-sampled batches of
        expected size ``cfg.batch_size`` drawn from a secret generator instead of the
        permutations above, per-sample clipping and Gaussian noise, every step counted by
        ``dp.ledger``. The model must come from
        :func:`~multimodal_fl.training.privacy.make_private_compatible`. An empty batch
        takes a step of noise alone; the loss averages the non-empty ones.
    optimizer_state : mutable mapping or None
        A holder of AdamW's per-parameter state (``{index: {"step", "exp_avg",
        "exp_avg_sq"}}``, the ``state`` of ``Optimizer.state_dict()``) carried between calls
        on the same model: the optimiser starts from the moments in it (empty: fresh), with
        this call's ``lr`` and ``weight_decay``, and leaves its own there at the end. ``None``:
        a fresh AdamW, nothing kept. Not with ``dp``.
    warmup_steps : int, default 0
        Before the ``steps``, this many steps that train the encoders' linear paths alone
        (:meth:`FusionModel.linear_path_parameters`, every other weight held, no proximal
        term; batch-norm running statistics still follow the batches, as in any training
        step), with an AdamW of their own at the path's learning rate, on batches from the
        same stream (``training.linear_warmup_steps``; the caller passes it at the start of
        a model's training: a centralized or local run, a site's first federated round).
        With validation, the warmed-up model is evaluated once (at ``start_step``) before
        the ``steps``, so early stopping can keep it. Not with ``dp``; a model without a
        linear path is refused.
    warmup_fit : bool, default False
        Instead of ``warmup_steps``, set the linear path to a logistic regression fitted on
        the training rows with tabular data, its L2 penalty chosen by cross-validation on
        them, and the fused heads' biases to zero
        (:func:`~multimodal_fl.training.warmup.fit_linear_path`,
        ``training.linear_warmup_fit``); validated once before the ``steps`` as above. Not
        with ``dp`` or ``warmup_steps``.

    Returns
    -------
    TrainResult
    """
    steps = cfg.steps if steps is None else int(steps)
    _refuse(model, train_data, steps, warmup_steps, dp=dp, proximal=proximal,
            optimizer_state=optimizer_state, warmup_fit=warmup_fit)
    device = resolve_device(cfg.device)
    model.to(device)
    pos_weight, notes = _pos_weight(train_data.labels)
    batch_size, enlarged = batch_size_for(train_data.labels, cfg.batch_size,
                                          cfg.min_rare_per_batch)
    if dp is not None and enlarged:
        raise ValueError("train: DP-SGD samples batches of training.batch_size; "
                         "training.min_rare_per_batch would make its sampling rate follow the "
                         "prevalence (set it to 0)")
    notes += enlarged
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))
    groups = model.optimizer_param_groups(cfg.lr)
    params = [p for g in groups for p in g["params"]]
    opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr,
                                                   weight_decay=cfg.weight_decay)
    if optimizer_state:
        _load_moments(opt, optimizer_state)
    validate = val_data is not None and len(val_data) > 0
    result = TrainResult(
        steps=0,
        last_step=start_step,
        loss=float("nan"),
        n_samples=len(train_data),
        modality_counts=train_data.modality_counts(),
        pos_weight=float(pos_weight),
        notes=notes,
    )
    stopper = EarlyStopping(cfg.patience)
    stream = _batch_stream(len(train_data), batch_size, generator)
    with contextlib.ExitStack() as stack:
        if dp is not None:
            opt, stream = stack.enter_context(
                dp_session(model, opt, len(train_data), cfg.batch_size, dp, device))
        stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(device)))
        stack.enter_context(_deterministic())
        torch.manual_seed(_generator_seed(generator))
        if warmup_fit:
            _fit_warm_up(model, train_data, loss_fn, generator, result)
        elif warmup_steps:
            _warm_up(model, train_data, loss_fn, stream, warmup_steps, cfg, device, augment,
                     result)
        if (warmup_fit or warmup_steps) and validate and steps:
            assert val_data is not None
            _validate(model, val_data, device, step=start_step,
                      train_loss=result.warmup_loss, result=result, stopper=stopper)
        loop = _Loop(model, train_data, loss_fn, opt, params, device, proximal, augment)
        for k in range(steps):
            step = start_step + k + 1
            value = loop.step(next(stream))
            result.steps = k + 1
            result.last_step = step
            if progress is not None:
                progress(step, value)
            if validate and step % cfg.eval_every == 0:
                assert val_data is not None
                stop = _validate(model, val_data, device, step=step,
                                 train_loss=loop.window_mean(), result=result,
                                 stopper=stopper)
                if stop:
                    result.stopped_early = True
                    break
    result.loss = loop.mean()
    if stopper.restore_best(model):
        result.best_step = stopper.best_step
        result.best_val_auc = float(stopper.best_value)
    if optimizer_state is not None:  # this optimiser ends here: its tensors need no copy
        optimizer_state.clear()
        optimizer_state.update(opt.state_dict()["state"])
    return result


def _refuse(model: FusionModel, train_data: CohortDataset, steps: int, warmup_steps: int, *,
            dp: DPSGD | None, proximal: ProximalFn | None,
            optimizer_state: MutableMapping[int, dict[str, torch.Tensor]] | None,
            warmup_fit: bool = False) -> None:
    """Raise ``ValueError`` for a :func:`train` call whose arguments do not go together."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps}")
    if warmup_steps and warmup_fit:
        raise ValueError("train: warmup_steps and warmup_fit are two ways to warm the linear "
                         "path up; give one")
    if (warmup_steps or warmup_fit) and dp is not None:
        raise ValueError("train: DP-SGD accounts for every use of the training rows; the linear "
                         "warm-up would sit outside it (no warmup_steps or warmup_fit with dp)")
    if (warmup_steps or warmup_fit) and not model.linear_path_parameters():
        raise ValueError("train: the linear warm-up fits the linear path, and this model has "
                         "none (modalities.tabular.linear_path: true)")
    if dp is not None and optimizer_state is not None:
        raise ValueError("train: DP-SGD starts Opacus' optimiser afresh; it takes no "
                         "optimizer_state")
    if dp is not None and proximal is not None:
        raise ValueError("train: DP-SGD does not take a proximal term (its gradient would "
                         "skip the clipping and the noise)")
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    if len(train_data) == 0:
        raise ValueError("train: the training set is empty")


def _warm_up(model: FusionModel, data: CohortDataset, loss_fn: nn.Module,
             stream: Iterator[torch.Tensor], steps: int, cfg: TrainingConfig,
             device: torch.device, augment: Callable[[Batch], Batch] | None,
             result: TrainResult) -> None:
    """``steps`` AdamW steps on the linear paths alone; every other weight held (restored after)."""
    groups = model.linear_path_groups(cfg.lr)
    path = [p for g in groups for p in g["params"]]
    ids = {id(p) for p in path}
    held = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        for p in held:
            p.requires_grad_(False)
        loop = _Loop(model, data, loss_fn, opt, path, device, None, augment)
        for _ in range(steps):
            loop.step(next(stream))
    finally:
        for p in held:
            p.requires_grad_(True)
    result.warmup_steps = steps
    result.warmup_loss = loop.mean()


def _fit_warm_up(model: FusionModel, data: CohortDataset, loss_fn: nn.Module,
                 generator: torch.Generator, result: TrainResult) -> None:
    """``warmup_fit``: the path set to a cross-validated logistic regression (result noted)."""
    # a fork of the generator seeds the folds: the batch stream stays the one without the fit
    seed = _generator_seed(torch.Generator().set_state(generator.get_state()))
    fitted = fit_linear_path(model, data, loss_fn, seed)
    result.warmup_loss = fitted.loss
    result.warmup_fit_C = fitted.C
    result.notes.append(fitted.note or (
        f"linear warm-up: logistic regression fitted on {fitted.n_rows} rows, "
        f"C = {fitted.C:g} by {fitted.folds}-fold cross-validation"))


def _load_moments(opt: torch.optim.Optimizer,
                  state: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
    """Give a fresh optimiser the per-parameter state of an earlier one (its own groups,
    so this call's learning rates); a state that does not fit the parameters is refused."""
    sizes = [p.numel() for g in opt.param_groups for p in g["params"]]
    for i, s in state.items():
        if not 0 <= int(i) < len(sizes) or any(
                v.numel() not in (1, sizes[int(i)]) for v in s.values()):
            raise ValueError(f"optimizer_state: entry {i} does not fit this model's "
                             f"{len(sizes)} parameters")
    current = opt.state_dict()
    current["state"] = {int(i): {k: v.clone() for k, v in s.items()} for i, s in state.items()}
    opt.load_state_dict(current)


def local_update(
    model: FusionModel,
    weights: Mapping[str, Any] | None,
    train_data: CohortDataset,
    cfg: TrainingConfig,
    *,
    steps: int,
    generator: torch.Generator,
    proximal: ProximalFn | None = None,
    augment: Callable[[Batch], Batch] | None = None,
    strict: bool = True,
    dp: DPSGD | None = None,
    optimizer_state: MutableMapping[int, dict[str, torch.Tensor]] | None = None,
    warmup_steps: int = 0,
    warmup_fit: bool = False,
) -> TrainResult:
    """One federated site's local training: load ``weights``, run ``steps`` steps, no validation.

    A fresh AdamW optimiser is created at every call, so the optimiser state is reset every
    round, unless the site passes the holder of its previous rounds' state
    (``optimizer_state``, ``federated.keep_optimizer_state``; see the module docstring).

    Parameters
    ----------
    model : FusionModel
        Updated in place.
    weights : mapping or None
        Starting state dict (``None``: keep the model's current weights).
    train_data : CohortDataset
    cfg : TrainingConfig
    steps : int
        Local steps.
    generator : torch.Generator
        Seeded by the caller, e.g. from (seed, site, round).
    proximal : callable or None
        FedProx term.
    augment : callable or None
        Training-batch augmentation.
    strict : bool, default True
        Passed to :func:`load_weights`.
    dp : DPSGD or None
        Train with DP-SGD (see :func:`train`).
    optimizer_state : mutable mapping or None
        The holder of this site's AdamW state across rounds (see :func:`train`).
    warmup_steps : int, default 0
        Linear-path steps before ``steps`` (see :func:`train`): the site passes
        ``training.linear_warmup_steps`` in its first round.
    warmup_fit : bool, default False
        The fitted linear warm-up instead (see :func:`train`;
        ``training.linear_warmup_fit``, first round).

    Returns
    -------
    TrainResult
        ``n_samples`` and ``modality_counts`` give the per-group sample counts
        (:meth:`FusionModel.group_counts`).
    """
    if weights is not None:
        load_weights(model, weights, strict=strict)
    return train(
        model, train_data, None, cfg, steps=steps, generator=generator, proximal=proximal,
        augment=augment, dp=dp, optimizer_state=optimizer_state, warmup_steps=warmup_steps,
        warmup_fit=warmup_fit,
    )

