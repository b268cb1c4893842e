"""Train the image encoder alone on PneumoniaMNIST (28 px) and report test AUC with a 95% CI.

The network is ``multimodal_fl.encoders.ImageEncoder`` (2D, 1 channel) whose projection
head outputs one logit; it is trained from scratch on the shared ``train`` split with
light augmentation (random shifts of up to 2 px), the epoch with the best validation AUC
is kept, and the test split is scored once. The 95% interval is a stratified percentile
bootstrap (``multimodal_fl.evaluation.metrics.bootstrap_ci``, 2000 resamples).

Published reference (MedMNIST v2, Yang et al. 2023, Table 3, PneumoniaMNIST test AUC):
ResNet-18 (28) 0.944, ResNet-50 (28) 0.948.

Usage (from the repository root)::

    .venv/bin/python benchmarks/pneumoniamnist.py [--encoder smallcnn|resnet18] [--epochs 10]

Prints a Markdown table for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multimodal_fl.encoders import ImageEncoder  # noqa: E402
from multimodal_fl.evaluation.metrics import bootstrap_ci  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"
PUBLISHED = {"ResNet-18 (28)": 0.944, "ResNet-50 (28)": 0.948}


def load_split(data: np.lib.npyio.NpzFile, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """Images as float tensors [N, 1, 28, 28] in [0, 1] and labels as int [N]."""
    x = torch.from_numpy(data[f"{split}_images"].astype(np.float32) / 255.0).unsqueeze(1)
    y = data[f"{split}_labels"].reshape(-1).astype(np.int64)
    return x, y


def shift_augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero padding), per batch."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    padded = nn.functional.pad(x, (max_shift,) * 4)
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, bs: int = 512) -> np.ndarray:
    """Sigmoid probabilities for all images."""
    model.eval()
    out = [torch.sigmoid(model(x[i : i + bs].to(device))[:, 0]).cpu() for i in range(0, len(x), bs)]
    return torch.cat(out).numpy()


def main() -> None:
    """Train, select on validation AUC, score the test split, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--encoder", default="smallcnn", choices=["smallcnn", "resnet18", "resnet10"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    if not args.data.is_file():
        sys.exit(f"PneumoniaMNIST not found at {args.data}; pass --data PATH/pneumoniamnist.npz")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = np.load(args.data)
    x_tr, y_tr = load_split(data, "train")
    x_va, y_va = load_split(data, "val")
    x_te, y_te = load_split(data, "test")
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr, x_va, x_te = ((x - mean) / std for x in (x_tr, x_va, x_te))

    model = ImageEncoder(args.encoder, spatial_dims=2, in_channels=1, embed_dim=1).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((len(x_tr) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    # class imbalance: weight positives by the negative/positive ratio of the train split
    pos_weight = torch.tensor([(y_tr == 0).sum() / max((y_tr == 1).sum(), 1)], device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    gen = torch.Generator().manual_seed(args.seed)
    y_tr_t = torch.from_numpy(y_tr).float()

    from sklearn.metrics import roc_auc_score

    best_auc, best_state, best_epoch = -1.0, None, -1
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            xb = shift_augment(x_tr[idx], gen).to(device)
            yb = y_tr_t[idx].to(device)
            opt.zero_grad()
            loss = loss_fn(model(xb)[:, 0], yb)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        val_auc = float(roc_auc_score(y_va, predict(model, x_va, device)))
        print(
            f"epoch {epoch:2d}  train loss {total / len(x_tr):.4f}  val AUC {val_auc:.4f}  "
            f"({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
        if val_auc > best_auc:
            best_auc, best_epoch = val_auc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_s = time.perf_counter() - t0
    assert best_state is not None
    model.load_state_dict(best_state)
    p_te = predict(model, x_te, device)
    auc = bootstrap_ci("auc", y_te, p_te, n_boot=args.n_boot, seed=args.seed)
    acc = float(((p_te > 0.5).astype(int) == y_te).mean())

    print(
        f"Train {len(x_tr)} / val {len(x_va)} / test {len(x_te)} images "
        f"(positives: train {y_tr.mean():.1%}, test {y_te.mean():.1%}); "
        f"{args.encoder}, {n_params:,} parameters, {args.epochs} epochs, batch {args.batch_size}, "
        f"AdamW lr {args.lr} one-cycle, pos_weight {float(pos_weight):.3f}, shift augmentation; "
        f"best validation AUC {best_auc:.4f} at epoch {best_epoch}; training {train_s:.0f} s on "
        f"{args.device} ({args.threads} threads); torch {torch.__version__}, "
        f"Python {platform.python_version()}, seed {args.seed}.\n"
    )
    print("| model | test AUC | 95% CI | test ACC (0.5) |")
    print("|---|---|---|---|")
    print(
        f"| this repo: ImageEncoder `{args.encoder}` (28) | {auc.value:.3f} | "
        f"{auc.lo:.3f} - {auc.hi:.3f} | {acc:.3f} |"
    )
    for name, ref in PUBLISHED.items():
        print(f"| MedMNIST v2 {name}, published | {ref:.3f} | - | - |")


if __name__ == "__main__":
    main()
