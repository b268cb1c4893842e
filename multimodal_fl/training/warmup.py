"""The fitted linear warm-up: an encoder's linear path set to a cross-validated logistic regression.

``training.linear_warmup_fit`` starts a model's training (a centralized or local run, a
federated site's first round) from the logistic regression that the tabular encoder's linear
path can express (:meth:`~multimodal_fl.encoders.tabular.TabularEncoder.linear_logit`: a linear
model of the standardised, mean-imputed features and their missingness indicators), fitted to
convergence on the training rows with tabular data, its L2 penalty chosen by stratified 5-fold
cross-validated AUC on those rows (scikit-learn's ``LogisticRegressionCV``, the same grid of
``C`` as the benchmarks' logistic-regression baselines; classes weighted ``"balanced"``, the
ratio of the training loss's ``pos_weight``). With the fused head's weights at zero
(:func:`~multimodal_fl.training.model.build_model`) and its biases set to zero here, the
model's logit for a patient with tabular data is then that regression's logit, and the deep
part learns what it misses.

Unlike ``training.linear_warmup_steps`` (AdamW steps on the path alone, a number to choose),
nothing here is a step count: the penalty is chosen inside the training rows the fit sees
(each site's own in federated round 1), so a small cohort gets a strong penalty rather than an
unpenalised fit that overfits. Nothing leaves the site but the model weights the site's update
sends anyway; a model trained with DP-SGD is refused (the fit would sit outside its
accounting).

Hand-written here: only the copy of the fitted coefficients into the path and the head; the
fit is scikit-learn's.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from torch import nn

from multimodal_fl.encoders.tabular import TabularEncoder
from multimodal_fl.fusion import FusionModel
from multimodal_fl.training.dataset import CohortDataset

__all__ = ["C_GRID", "FOLDS", "PathFit", "fit_linear_path"]

log = logging.getLogger(__name__)

#: The inverse penalties tried (``LogisticRegressionCV(Cs=...)``): the benchmarks' baseline grid.
C_GRID = np.logspace(-3, 2, 11)
#: Cross-validation folds (fewer when the rarer class has fewer rows; at least 2).
FOLDS = 5


@dataclass(frozen=True)
class PathFit:
    """What :func:`fit_linear_path` did.

    Attributes
    ----------
    C : float or None
        The chosen inverse L2 penalty (None: not fitted, see ``note``).
    folds : int
        Cross-validation folds used (0: not fitted).
    n_rows : int
        Training rows with tabular data the fit saw.
    loss : float
        The training loss (``pos_weight``-ed BCE) of the fitted path on those rows (NaN: not
        fitted).
    note : str
        Why the path was not fitted ("" when it was).
    """

    C: float | None
    folds: int
    n_rows: int
    loss: float
    note: str = ""


def _path_encoder(model: FusionModel) -> tuple[int, TabularEncoder]:
    """The one encoder with a linear path and its modality column; refused otherwise."""
    found = [(j, enc) for j, enc, _ in model.path_encoders() if isinstance(enc, TabularEncoder)]
    if len(found) != 1:
        raise ValueError(f"train: the fitted linear warm-up fits exactly one encoder's linear "
                         f"path; this model has {len(found)}")
    return found[0]


def fit_linear_path(model: FusionModel, data: CohortDataset, loss_fn: nn.Module,
                    seed: int) -> PathFit:
    """Set the linear path to a cross-validated logistic regression and the head to zero.

    Parameters
    ----------
    model : FusionModel
        Its tabular encoder's ``linear`` (weight and bias) is overwritten with the fit, and
        every fused head's weights and bias set to zero (the weights are zero already when
        :func:`~multimodal_fl.training.model.build_model` built it), in place; nothing else
        changes. The encoder's standardiser must be set.
    data : CohortDataset
        The training rows; those with tabular data are fitted.
    loss_fn : nn.Module
        The training loss (``BCEWithLogitsLoss`` with its ``pos_weight``), to report the
        fit's training loss in the same units as the steps'.
    seed : int
        Seeds the folds' shuffle.

    Returns
    -------
    PathFit
        The chosen ``C`` or, when the rows cannot be fitted (fewer than 2 rows of either
        class), why not; the path and head are then left as they were.
    """
    j, encoder = _path_encoder(model)
    rows = data.mask[:, j].nonzero().flatten()
    y = data.labels.index_select(0, rows).numpy().astype(np.int64)
    rarer = int(min(y.sum(), len(y) - y.sum())) if len(y) else 0
    if rarer < 2:
        note = (f"linear warm-up not fitted: {len(y)} training rows with tabular data, "
                f"{rarer} of the rarer class (at least 2 needed)")
        return PathFit(C=None, folds=0, n_rows=len(y), loss=float("nan"), note=note)
    folds = min(FOLDS, rarer)
    linear = encoder.linear
    assert isinstance(linear, nn.Linear)
    with torch.no_grad():
        x = data.inputs[model.modalities[j]].index_select(0, rows)
        z = encoder.prepare(x.to(linear.weight.device)).cpu().numpy().astype(np.float64)
    fit = LogisticRegressionCV(
        Cs=C_GRID, cv=StratifiedKFold(folds, shuffle=True, random_state=seed % 2**32),
        scoring="roc_auc", class_weight="balanced", max_iter=5000)
    with warnings.catch_warnings():  # max_iter is generous; a slow C on the grid is no harm
        warnings.simplefilter("ignore", ConvergenceWarning)
        # scikit-learn 1.9 announces new defaults (l1_ratios, simpler fitted attributes):
        # the fit is plain L2, and its attributes are read below in either form
        warnings.simplefilter("ignore", FutureWarning)
        fit.fit(z, y)
    coef = np.ravel(fit.coef_).astype(np.float64)
    intercept = float(np.ravel(fit.intercept_)[0])
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(coef, dtype=linear.weight.dtype).view_as(linear.weight))
        linear.bias.fill_(intercept)
        # the weights: done by build_model already; a model built otherwise too
        model.zero_head_weights(bias=True)
        logits = torch.as_tensor(z @ coef + intercept, dtype=torch.float32)
        loss = float(loss_fn(logits.to(linear.weight.device),
                             torch.as_tensor(y, dtype=torch.float32,
                                             device=linear.weight.device)))
    C = float(np.ravel(fit.C_)[0])
    log.debug("linear warm-up: C = %g by %d-fold CV on %d rows", C, folds, len(y))
    return PathFit(C=C, folds=folds, n_rows=len(y), loss=loss)
