"""Fine-tune an EfficientNet on HAM10000-style data (metadata CSV + image folders).

Resumable: every epoch writes ``last.pt`` (model, EMA, optimizer, schedule, history);
rerunning the same command continues from it, drawing the same data order and
augmentations as an uninterrupted run (every generator is reseeded per epoch). The best epoch by validation balanced
accuracy is written as a release-format checkpoint ``best.pt`` with a calibration
(temperature and class biases) fitted on the validation split for every test-time
augmentation mode.

``--init-checkpoint`` continues from a release checkpoint instead of ImageNet weights, and
``--freeze-blocks N`` freezes the stem and the first N stages (weights and batch-norm
statistics): fine-tuning an already adapted model that way runs about 2.7x faster on a CPU.

Example:
    python scripts/train.py --metadata ../shared/data/ham10000-224/metadata.csv \
        --images ../shared/data/ham10000-224/images --output runs/lite0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handler.data import LesionDataset, attach_paths, class_counts, lesion_grouped_split, read_labels  # noqa: E402
from handler.calibration import TTA_MODES, augmented_views, fit_calibration, merge_views  # noqa: E402
from handler.decision import decide  # noqa: E402
from handler.evaluation import classification_report, format_report  # noqa: E402
from handler.labels import CLASS_CODES  # noqa: E402
from handler.model import (  # noqa: E402
    ARCHITECTURES, build_model, checkpoint_provenance, default_preprocess_config, freeze_early_layers, imagenet_weights_path,
    load_imagenet_backbone, make_checkpoint)
from handler.preprocessing import PreprocessConfig, build_eval_transform, build_train_transform, normalize_batch  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options of the training script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--metadata", required=True, help="HAM10000 metadata CSV (lesion_id, image_id, dx)")
    parser.add_argument("--images", nargs="+", required=True, help="one or more image folders")
    parser.add_argument("--output", required=True, help="run folder for last.pt, best.pt and metrics.jsonl")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="efficientnet_lite0")
    parser.add_argument("--pretrained", default="auto",
                        help="'auto' (ImageNet weights found locally, error if none), 'none', or a state-dict path")
    parser.add_argument("--init-checkpoint",
                        help="start from this release-format checkpoint (same --arch) instead of ImageNet weights")
    parser.add_argument("--freeze-blocks", type=int, default=0,
                        help="freeze the stem and this many stages after it (weights and batch-norm statistics)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--imbalance", choices=("weighted_loss", "sampler", "focal", "none"), default="weighted_loss",
                        help="class-imbalance handling")
    parser.add_argument("--class-weight-power", type=float, default=0.5,
                        help="class weights are (1/frequency)**power, for the loss, the sampler or focal alpha")
    parser.add_argument("--focal-gamma", type=float, default=2.0)
    parser.add_argument("--label-smoothing", type=float, default=0.05)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--min-crop-scale", type=float, default=0.5)
    parser.add_argument("--ema-decay", type=float, default=0.999, help="0 disables the weight EMA")
    parser.add_argument("--patience", type=int, default=8, help="early stop after this many epochs without improvement")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--split-seed", type=int,
                        help="seed of the train/validation split (default: --seed); give ensemble members "
                             "different --seed values and one --split-seed")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="autocast: auto = bf16 on CUDA with bf16 support, fp16 on other CUDA, fp32 on CPU "
                             "(bf16 autocast made CPU training 12x slower on this machine's depthwise convolutions)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=0, help="use only this many images (smoke tests)")
    parser.add_argument("--model-version", default="0.0.0-dev", help="version written into best.pt")
    parser.add_argument("--no-resume", action="store_true", help="start over even if last.pt exists")
    parser.add_argument("--epochs-this-run", type=int, default=0,
                        help="stop cleanly after this many epochs (time-boxed sessions); rerun to continue")
    return parser


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int) -> None:
    """Reseed every generator from (seed, epoch) at the start of an epoch.

    The shuffle order, the augmentations (drawn in fresh workers seeded from the global
    generator) and dropout then depend only on the epoch, so a resumed run continues exactly
    as an uninterrupted one would.
    """
    seed_everything(seed * 100_003 + epoch)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device, or None for full fp32."""
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class FocalLoss(nn.Module):
    """Multi-class focal loss with per-class alpha weights."""

    def __init__(self, alpha: torch.Tensor, gamma: float, label_smoothing: float) -> None:
        super().__init__()
        self.register_buffer("alpha", alpha)
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        p_true = torch.softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        return (self.alpha[target] * (1 - p_true) ** self.gamma * ce).mean()


def warmup_ema_update(decay: float):
    """EMA update whose decay ramps up as ``(1 + n) / (10 + n)`` so early averages are not stuck at the initial weights."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        step = float(num_averaged)
        effective = min(decay, (1 + step) / (10 + step))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, 1 - effective)
            else:
                a.copy_(c)

    return update


def class_weights(counts: list[int], power: float) -> torch.Tensor:
    """Inverse-frequency weights to the given power, normalized to a mean of 1 over samples."""
    counts_t = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    weights = (counts_t.sum() / counts_t) ** power
    return weights / (weights * counts_t).sum() * counts_t.sum()


def make_loaders(args: argparse.Namespace, train, val, preprocess: PreprocessConfig, device: torch.device):
    """Training and validation data loaders; the sampler variant draws classes by weight."""
    train_set = LesionDataset(train, build_train_transform(preprocess, args.min_crop_scale))
    val_set = LesionDataset(val, build_eval_transform(preprocess))
    common = dict(num_workers=args.workers, pin_memory=device.type == "cuda")
    sampler = None
    if args.imbalance == "sampler":
        per_class = class_weights(class_counts(train), args.class_weight_power)
        sample_weights = per_class[torch.tensor([r.label for r in train])]
        sampler = torch.utils.data.WeightedRandomSampler(sample_weights, num_samples=len(train), replacement=True)
    # Training workers are not persistent: fresh workers take their seeds from the generator
    # that seed_epoch resets, which is what makes resuming exact.
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None,
                                               sampler=sampler, drop_last=True, **common)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size * 2, shuffle=False,
                                             persistent_workers=args.workers > 0, **common)
    return train_loader, val_loader


def make_criterion(args: argparse.Namespace, counts: list[int]) -> nn.Module:
    """The loss for the chosen imbalance handling."""
    if args.imbalance == "weighted_loss":
        return nn.CrossEntropyLoss(weight=class_weights(counts, args.class_weight_power), label_smoothing=args.label_smoothing)
    if args.imbalance == "focal":
        return FocalLoss(class_weights(counts, args.class_weight_power), args.focal_gamma, args.label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)


@torch.no_grad()
def predict_logits(model: nn.Module, loader, preprocess: PreprocessConfig, device: torch.device, amp: torch.dtype | None,
                   tta: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (view-averaged under test-time augmentation ``tta``) and labels for a whole loader, in fp32."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        inputs = normalize_batch(images.to(device, non_blocking=True), preprocess)
        with autocast(device, amp):
            logits = model(augmented_views(inputs, tta))
        all_logits.append(merge_views(logits.float(), tta).cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def load_release_weights(model: nn.Module, arch: str, preprocess: PreprocessConfig, path: str) -> str:
    """Copy all weights (head included) from a release-format checkpoint, to continue training it.

    Returns:
        A provenance line naming the checkpoint, its version and its SHA-256 prefix.

    Raises:
        ValueError: If the checkpoint has another architecture or preprocessing.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint["config"]["arch"] != arch:
        raise ValueError(f"{path} is a {checkpoint['config']['arch']}, not {arch}")
    if PreprocessConfig.from_dict(checkpoint["meta"]["preprocessing"]) != preprocess:
        raise ValueError(f"{path} was trained with other preprocessing: {checkpoint['meta']['preprocessing']}")
    model.load_state_dict(checkpoint["state_dict"])
    return checkpoint_provenance(path, checkpoint["meta"])


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context, or a no-op when running in fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train, validate each epoch, early-stop, and write ``best.pt`` with fitted calibrations.

    Returns:
        The validation report of the released (best) weights, calibrated, or None when
        the run paused early because of ``--epochs-this-run``.
    """
    seed_everything(args.seed)
    split_seed = args.seed if args.split_seed is None else args.split_seed
    device = resolve_device(args.device)
    amp = autocast_dtype(args.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    records = attach_paths(read_labels(args.metadata), args.images)
    if args.limit:
        records = random.Random(split_seed).sample(records, min(args.limit, len(records)))
    train, val = lesion_grouped_split(records, args.val_fraction, split_seed)
    if {r.lesion_id for r in train} & {r.lesion_id for r in val}:
        raise RuntimeError("lesion-grouped split leaked a lesion into both sides")
    counts = class_counts(train)
    print(f"train {len(train)} images {dict(zip(CLASS_CODES, counts))}; val {len(val)} images "
          f"{dict(zip(CLASS_CODES, class_counts(val)))}; device {device}, autocast {amp}", flush=True)
    (output / "split.json").write_text(json.dumps({"seed": split_seed, "val_fraction": args.val_fraction,
                                                   "val_image_ids": sorted(r.image_id for r in val)}, indent=0))

    preprocess = default_preprocess_config(args.arch, args.image_size)
    model = build_model(args.arch, dropout=args.dropout)
    weights_source = "random initialization"
    if args.init_checkpoint:
        weights_source = load_release_weights(model, args.arch, preprocess, args.init_checkpoint)
    elif args.pretrained != "none":
        path = imagenet_weights_path(args.arch) if args.pretrained == "auto" else args.pretrained
        if path is None:
            raise SystemExit(f"no local ImageNet weights for {args.arch}; pass --pretrained PATH or --pretrained none")
        copied = load_imagenet_backbone(model, args.arch, path)
        weights_source = f"ImageNet ({os.path.basename(path)}, {copied} tensors)"
    print(f"initialized from {weights_source}", flush=True)
    model = model.to(device).to(memory_format=torch.channels_last)
    frozen = freeze_early_layers(model, args.freeze_blocks)
    ema = None
    if args.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=warmup_ema_update(args.ema_decay), use_buffers=True)

    train_loader, val_loader = make_loaders(args, train, val, preprocess, device)
    criterion = make_criterion(args, counts).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    # OneCycleLR needs at least two warm-up steps; only tiny smoke runs come near that.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps,
                                                    pct_start=max(args.warmup_fraction, 2 / total_steps), anneal_strategy="cos")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    state_path = output / "last.pt"
    start_epoch, best_score, best_epoch, history = 0, -1.0, -1, []
    if state_path.exists() and not args.no_resume:
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_score, best_epoch, history = state["epoch"] + 1, state["best_score"], state["best_epoch"], state["history"]
        print(f"resumed from {state_path} at epoch {start_epoch}", flush=True)

    eval_model = ema.module if ema is not None else model
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args.seed, epoch)
        model.train()
        for module in frozen:
            module.eval()
        started = time.perf_counter()
        running_loss, seen = 0.0, 0
        progress = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True, mininterval=5)
        for images, labels in progress:
            inputs = normalize_batch(images.to(device, non_blocking=True), preprocess)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, amp):
                loss = criterion(model(inputs).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            running_loss += loss.item() * len(labels)
            seen += len(labels)
            progress.set_postfix(loss=f"{running_loss / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        train_seconds = time.perf_counter() - started
        logits, labels = predict_logits(eval_model, val_loader, preprocess, device, amp)
        report = classification_report(torch.softmax(logits, 1).numpy(), labels.numpy())
        val_loss = float(nn.functional.cross_entropy(logits, labels))
        row = {"epoch": epoch + 1, "train_loss": running_loss / max(seen, 1), "val_loss": val_loss,
               "val_balanced_accuracy": report["balanced_accuracy"], "val_accuracy": report["accuracy"],
               "val_macro_auc": report["macro_auc"], "lr": scheduler.get_last_lr()[0],
               "train_images_per_s": seen / train_seconds, "epoch_seconds": time.perf_counter() - started}
        history.append(row)
        with open(output / "metrics.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
        improved = report["balanced_accuracy"] > best_score
        if improved:
            best_score, best_epoch = report["balanced_accuracy"], epoch + 1
            torch.save({"state_dict": eval_model.state_dict(), "epoch": epoch + 1}, output / "best_weights.pt")
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
              + (" *best*" if improved else ""), flush=True)
        state = {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                 "best_score": best_score, "best_epoch": best_epoch, "history": history}
        torch.save(state, output / "last.pt.tmp")
        os.replace(output / "last.pt.tmp", state_path)
        if epoch + 1 - best_epoch >= args.patience:
            print(f"early stop: no improvement in validation balanced accuracy for {args.patience} epochs", flush=True)
            break
        if args.epochs_this_run and epoch + 1 - start_epoch >= args.epochs_this_run and epoch + 1 < args.epochs:
            print(f"paused after epoch {epoch + 1}; rerun the same command to resume from {state_path}", flush=True)
            return None

    best = torch.load(output / "best_weights.pt", map_location=device, weights_only=True)
    eval_model.load_state_dict(best["state_dict"])
    calibrations, reports, uncalibrated_ece, balanced_rule_accuracy = {}, {}, {}, {}
    for tta in TTA_MODES:
        logits, labels = predict_logits(eval_model, val_loader, preprocess, device, amp, tta)
        calibrations[tta] = fit_calibration(logits, labels)
        probabilities = calibrations[tta].apply(logits)
        reports[tta] = classification_report(probabilities.numpy(), labels.numpy())
        calls = decide(probabilities, "balanced", calibrations[tta].class_prior).numpy()
        balanced_rule_accuracy[tta] = classification_report(probabilities.numpy(), labels.numpy(),
                                                            predictions=calls)["balanced_accuracy"]
        uncalibrated_ece[tta] = classification_report(torch.softmax(logits, 1).numpy(), labels.numpy())["ece"]
        print(f"TTA {tta}: {calibrations[tta]}, balanced accuracy {reports[tta]['balanced_accuracy']:.4f} "
              f"(balanced rule {balanced_rule_accuracy[tta]:.4f}), macro AUC {reports[tta]['macro_auc']:.4f}, "
              f"ECE {reports[tta]['ece']:.4f}", flush=True)
    calibrated = reports["none"]
    meta = {
        "version": args.model_version,
        "calibration": {tta: calibration.to_dict() for tta, calibration in calibrations.items()},
        "trained_epochs": len(history),
        "best_epoch": best["epoch"],
        "initialization": weights_source,
        "data": {"metadata": os.path.basename(args.metadata), "train_images": len(train), "val_images": len(val),
                 "train_class_counts": dict(zip(CLASS_CODES, counts)),
                 "split": f"StratifiedGroupKFold by lesion_id, val_fraction {args.val_fraction}, seed {split_seed}"},
        "validation": {k: calibrated[k] for k in ("balanced_accuracy", "accuracy", "macro_auc", "ece")}
                      | {"ece_uncalibrated": uncalibrated_ece["none"],
                         "balanced_rule_balanced_accuracy": balanced_rule_accuracy["none"]},
        "command": "python scripts/train.py " + shlex.join(sys.argv[1:]),
        "torch": str(torch.__version__),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    checkpoint = make_checkpoint(eval_model, args.arch, preprocess, meta, args.dropout)
    torch.save(checkpoint, output / "best.pt")
    (output / "val_report.json").write_text(json.dumps(calibrated, indent=2))
    print(f"best epoch {best['epoch']}\n{format_report(calibrated)}", flush=True)
    return calibrated


if __name__ == "__main__":
    main(get_args_parser().parse_args())
