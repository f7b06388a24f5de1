"""Fine-tuning the pretrained encoder on DWIs (paper Section 4.3, Table 6): last encoder block + an MLP head.

The encoder of a checkpoint is frozen except its last block and final LayerNorm; an MLP head (``MLPHead``) on the
scan latent (``extract.scan_latent``: brain-weighted mean of slab CLS vectors, whole field of view) predicts the
target. Optionally LoRA adapters (rank 12, alpha 12 in the paper) are added to every attention projection of the
encoder (``qkv`` and ``proj`` of the diffusion and spatial attentions; not the decoder) through ``peft.inject_adapter_in_model``.

Training: AdamW (betas 0.9 / 0.999), lr 5e-5 constant (or cosine to ``final_lr``), weight decay 0.01, 50 epochs,
batches of 6 subjects (gradients accumulated subject by subject, since each has its own grid and protocol). Every
epoch each training subject gets a new random protocol (``volumes`` diffusion-weighted volumes + one b0, seeded by
(seed, subject, epoch)); validation and test use draw 0. The epoch with the lowest validation loss is kept.
Regression targets are z-scored with the training fold's statistics; reported metrics are in the target's units.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io import load_dwi
from ..model import DRoPEMAE, load_model, read_metadata
from ..preprocess import brain_mask
from ..reconstruct import ReconstructSettings, resolve_slab
from .crossval import fold_metrics
from .extract import draw_protocol, draw_seed, prepare_subject, scan_latent
from .probes import MLPHead, class_weights

log = logging.getLogger(__name__)

LORA_TARGETS = r"blocks\.\d+\.(diffusion|spatial)\.attn\.(qkv|proj)"


class FinetuneError(ValueError):
    """Settings that cannot work (LoRA without peft, too few subjects, ...)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters (defaults: paper Table 6, age prediction)."""

    epochs: int = 50
    lr: float = 5e-5
    final_lr: float | None = None  # None = constant learning rate, else cosine from lr to final_lr
    weight_decay: float = 0.01
    batch_size: int = 6
    lora: bool = False
    lora_rank: int = 12
    lora_alpha: int = 12
    volumes: int | None = 12
    hidden: int = 256
    class_weight: str | None = None
    seed: int = 0
    slab: int | None = None


class FinetuneNet(nn.Module):
    """Encoder (last block trainable, optional LoRA) + MLP head on the scan latent."""

    def __init__(self, encoder: DRoPEMAE, n_out: int, config: FinetuneConfig):
        super().__init__()
        self.encoder = encoder
        if config.lora:
            try:
                from peft import LoraConfig, inject_adapter_in_model
            except ImportError as err:
                raise FinetuneError("LoRA needs the package peft (pip install peft); run without --lora") from err
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                              target_modules=LORA_TARGETS, bias="none")
            self.encoder = inject_adapter_in_model(lora, encoder)
        for name, param in self.encoder.named_parameters():
            param.requires_grad = "lora_" in name
        for module in (self.encoder.blocks[-1], self.encoder.norm):
            module.requires_grad_(True)
        self.head = MLPHead(encoder.config.embed_dim, n_out, hidden=config.hidden)

    def forward(self, prep, slab: int, device) -> torch.Tensor:
        """(K,) head output for one preprocessed scan."""
        latent = scan_latent(self.encoder, prep, slab, device, grad=torch.is_grad_enabled())
        return self.head(latent[None])[0]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach().clone() for n, t in self.state_dict().items() if n in names}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def learning_rate(config: FinetuneConfig, epoch: int) -> float:
    if config.final_lr is None or config.epochs <= 1:
        return config.lr
    t = epoch / (config.epochs - 1)
    return config.final_lr + 0.5 * (config.lr - config.final_lr) * (1 + math.cos(math.pi * t))


class SubjectStore:
    """Loads each DWI on demand and keeps its brain mask (the DWI itself is re-read to bound memory)."""

    def __init__(self, paths: dict[str, Path], patch):
        self.paths, self.patch, self.masks = paths, patch, {}

    def prepared(self, subject: str, volumes: int | None, seed):
        dwi = load_dwi(self.paths[subject])
        if subject not in self.masks:
            self.masks[subject] = brain_mask(dwi)
        index = draw_protocol(dwi, volumes, seed)
        return prepare_subject(dwi, index, self.patch, self.masks[subject])


def finetune_fold(
    checkpoint,
    store_paths: dict[str, Path],
    targets: dict[str, float | int],
    fold: dict,
    task: str,
    n_classes: int,
    config: FinetuneConfig,
    device="cpu",
    log_rows: list | None = None,
    fold_index: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict, list[dict], int]:
    """Fine-tune on fold["train"], select the epoch on fold["val"], score fold["test"].

    targets: {subject: float (regression) or class index}. Returns (metrics, prediction rows, best epoch).
    """
    device = torch.device(device)
    regression = task == "regression"
    train, val, test = list(fold["train"]), list(fold.get("val", [])), list(fold["test"])
    if not train or not test:
        raise FinetuneError(f"fold {fold_index}: empty train or test set")
    y_train = np.array([targets[s] for s in train], dtype=np.float64)
    y_mean, y_std = (float(y_train.mean()), float(y_train.std()) or 1.0) if regression else (0.0, 1.0)
    meta = read_metadata(checkpoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + fold_index)
        encoder = load_model(checkpoint, device="cpu")
        net = FinetuneNet(encoder, 1 if regression else n_classes, config).to(device)
    slab = resolve_slab(ReconstructSettings(slab=config.slab), meta, encoder.config.patch_size[2])
    store = SubjectStore(store_paths, encoder.config.patch_size)
    if regression:
        loss_fn = nn.MSELoss()
    else:
        weights = class_weights(np.array([targets[s] for s in train], dtype=np.int64), n_classes, config.class_weight)
        loss_fn = nn.CrossEntropyLoss(weight=torch.as_tensor(weights, dtype=torch.float32, device=device))

    def target(subject):
        if regression:
            return torch.tensor([(targets[subject] - y_mean) / y_std], dtype=torch.float32, device=device)
        return torch.tensor(int(targets[subject]), device=device)

    def loss_of(out, subject):
        return loss_fn(out, target(subject)) if regression else loss_fn(out[None], target(subject)[None])

    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)
    rng = np.random.default_rng([config.seed, fold_index])
    best = (float("inf"), net.trainable_state(), 0)
    for epoch in range(config.epochs):
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        net.train()
        order = [train[i] for i in rng.permutation(len(train))]
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed * 1000 + epoch * 7919 + start)
                for subject in batch:
                    prep = store.prepared(subject, config.volumes, draw_seed(config.seed, subject, 1 + epoch))
                    loss = loss_of(net(prep, slab, device), subject) / len(batch)
                    loss.backward()
                    total += float(loss) * len(batch)
            optimizer.step()
        val_loss = _evaluate_loss(net, store, val, loss_of, config, slab, device) if val else total / len(train)
        if val_loss < best[0]:
            best = (val_loss, net.trainable_state(), epoch + 1)
        row = {"fold": fold_index, "epoch": epoch + 1, "lr": lr, "train_loss": total / len(train), "val_loss": val_loss}
        if log_rows is not None:
            log_rows.append(row)
        if progress:
            progress(f"fold {fold_index} epoch {epoch + 1}/{config.epochs}: train {row['train_loss']:.4f}, val {val_loss:.4f}")
    net.load_state_dict(best[1], strict=False)
    outputs = _predict(net, store, test, config, slab, device)
    if regression:
        prediction = outputs[:, 0] * y_std + y_mean
        truth = np.array([targets[s] for s in test], dtype=np.float64)
    else:
        prediction = torch.softmax(torch.as_tensor(outputs), dim=1).numpy()
        truth = np.array([targets[s] for s in test], dtype=np.int64)
    metrics = fold_metrics(task, truth, prediction)
    rows = [{"fold": fold_index, "subject_id": s, "true": t.item(), "predicted": (p.item() if regression else int(np.argmax(p)))}
            for s, t, p in zip(test, truth, prediction)]
    log.info("fold %d: best epoch %d (val loss %.4f), %d trainable parameters", fold_index, best[2], best[0],
             net.trainable_parameters())
    return metrics, rows, best[2]


@torch.no_grad()
def _predict(net, store, subjects: Sequence[str], config, slab, device) -> np.ndarray:
    net.eval()
    outs = [net(store.prepared(s, config.volumes, draw_seed(config.seed, s, 0)), slab, device).double().cpu().numpy()
            for s in subjects]
    return np.stack(outs)


@torch.no_grad()
def _evaluate_loss(net, store, subjects, loss_of, config, slab, device) -> float:
    net.eval()
    losses = [float(loss_of(net(store.prepared(s, config.volumes, draw_seed(config.seed, s, 0)), slab, device), s))
              for s in subjects]
    return float(np.mean(losses))
