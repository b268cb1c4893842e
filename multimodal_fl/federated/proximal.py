"""FedProx's proximal term, added to the local loss at the site (torch; no FL logic)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["proximal_term"]


def proximal_term(
    params: Iterable[tuple[str, torch.Tensor]],
    global_params: Mapping[str, torch.Tensor],
    mu: float,
) -> torch.Tensor:
    """``mu / 2 * sum ||w - w_global||^2`` over trainable parameters (Li et al., 2020).

    Parameters
    ----------
    params : Iterable[tuple[str, torch.Tensor]]
        ``model.named_parameters()``; parameters with ``requires_grad=False`` are skipped.
    global_params : Mapping[str, torch.Tensor]
        The global weights the round started from, by the same names (detached).
    mu : float
        The proximal coefficient (``Request.config["proximal_mu"]``); ``0`` gives a zero
        term whose gradient is exactly zero.

    Returns
    -------
    torch.Tensor
        A scalar to add to the loss.

    Raises
    ------
    KeyError
        If a trainable parameter has no global counterpart.
    """
    total: torch.Tensor | None = None
    for name, param in params:
        if not param.requires_grad:
            continue
        if name not in global_params:
            raise KeyError(
                f"parameter {name!r} has no global value; global_params has "
                f"{len(global_params)} entries (pass the round's starting weights by name)"
            )
        diff = param - global_params[name].detach().to(param.dtype)
        term = (diff * diff).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total
