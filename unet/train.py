"""Training loop for the U-Net: the paper's weighted cross-entropy and SGD with momentum 0.99.

Pure PyTorch. Tracking happens at the edge: :func:`fit` calls ``on_epoch_end(stats)`` after every
epoch, and the caller (a Prefect task) forwards it to MLflow.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from octseg.unet.config import InferenceConfig, TrainConfig, UNetConfig
from octseg.unet.data import BScanSet, EpochSampler, TileDataset
from octseg.unet.resample import resample_set
from octseg.unet.inference import CHANNELS_LAST_DEVICES, resolve_device, segment_volume
from octseg.unet.losses import soft_dice_loss, weighted_cross_entropy
from octseg.unet.metrics import dice_per_class
from octseg.unet.model import choose_tile_size

__all__ = ["EpochStats", "augmentation", "evaluate", "fit", "lr_factor", "make_optimizer", "training_loss",
           "training_tile", "validation_inference", "weight_average"]

log = logging.getLogger(__name__)

EMA_START_SHARE = 0.05  # the most the first step's weights may weigh in the weight average at the end
TILE_CHUNK = 8  # batches drawn ahead at a time when tiles load in the training process (see _in_chunks)


@dataclass
class EpochStats:
    """What one epoch measured; ``val_dice`` maps class -> Dice pooled over the validation set."""

    epoch: int
    train_loss: float
    seconds: float
    val_dice: dict[int, float] = field(default_factory=dict)


def training_tile(config: UNetConfig, image_hw: tuple[int, int], cfg: TrainConfig) -> tuple[int, int]:
    """(height, width) of the training input tile for B-scans of ``image_hw`` as the network sees them:
    ``cfg.tile_size`` square, else the tile rule's square (:func:`~octseg.unet.model.choose_tile_size`), or with
    ``cfg.wide_tiles`` its height and the width the rule allows along the B-scan's own width."""
    if cfg.tile_size:
        return cfg.tile_size, cfg.tile_size
    side = choose_tile_size(config, image_hw, cfg.max_tile)
    if not cfg.wide_tiles:
        return side, side
    return side, max(side, choose_tile_size(config, (image_hw[1], image_hw[1]), cfg.max_tile))


def validation_inference(cfg: TrainConfig) -> InferenceConfig:
    """How training scores its model: as ``octseg segment`` would by default, on the training device."""
    return InferenceConfig(device=cfg.device)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def evaluate(model: torch.nn.Module, data: BScanSet, inference: InferenceConfig = InferenceConfig()) -> dict[int, float]:
    """Per-class Dice over the pooled pixels of ``data``; a class absent from both gives NaN."""
    preds = segment_volume(model, data.images, inference)
    return {k: float(d) for k, d in enumerate(dice_per_class(preds, data.labels, model.config.out_channels))}


def training_loss(logits: torch.Tensor | list[torch.Tensor], target: torch.Tensor, weight: torch.Tensor,
                  dice_weight: float) -> torch.Tensor:
    """The paper's weighted cross-entropy, plus ``dice_weight`` x the foreground soft Dice when > 0.

    A list of logits (deep supervision: full resolution first, then each coarser level) gives nnU-Net's
    sum over levels with weights 1/2^i (normalised), each against the target and weights taken at that
    level's pixel centres."""
    if isinstance(logits, (list, tuple)):
        scales = [1.0 / 2**i for i in range(len(logits))]
        total = sum(scales)
        return sum(w / total * training_loss(out.float(), *_at_level(target, weight, out.shape[-2:]), dice_weight)
                   for w, out in zip(scales, logits))
    loss = weighted_cross_entropy(logits, target, weight)
    if dice_weight > 0:
        loss = loss + dice_weight * soft_dice_loss(logits, target, include_background=False)
    return loss


def _at_level(target: torch.Tensor, weight: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and weights (N, H, W) at a decoder level of ``hw`` pixels (H = s h): every s-th pixel, centred."""
    step = target.shape[-1] // hw[-1]
    if step == 1:
        return target, weight
    pick = (..., slice(step // 2, None, step), slice(step // 2, None, step))
    return target[pick], weight[pick]


def _in_chunks(loader, size: int):
    """The loader's batches, drawn ``size`` at a time before any is used. On a CPU without loader processes
    this is measurably faster than drawing one batch between two steps: a tile's deformation run between
    the steps of a ~0.5 s training loop slowed the next step by ~60 ms beyond its own ~20 ms (caches), whereas
    training on tiles drawn ahead runs at the bare loop's speed (benchmarks/train.py)."""
    it = iter(loader)
    while chunk := list(itertools.islice(it, size)):
        yield from chunk


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Learning-rate multiplier at iteration ``step`` of ``total``: constant 1, poly (1 - t)^0.9 (nnU-Net)
    or cosine 0.5 (1 + cos(pi t)), t = step / total."""
    t = min(step, total) / max(total, 1)
    if schedule == "poly":
        return (1.0 - t) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + float(np.cos(np.pi * t)))
    return 1.0


def _train_epoch(model, loader, optimizer, device, amp, dice_weight: float, chunk: int = 1,
                 lr_at: Callable[[int], float] | None = None, after_step: Callable[[], None] | None = None) -> float:
    """One pass over the loader; ``lr_at(i)`` sets the learning rate before the i-th step of the epoch,
    ``after_step()`` runs after each optimiser step."""
    model.train()
    total, count = 0.0, 0
    for i, batch in enumerate(_in_chunks(loader, chunk) if chunk > 1 else loader):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(i)
        x = batch["image"].to(device, non_blocking=True)
        y = batch["target"].to(device, non_blocking=True)
        w = batch["weight"].to(device, non_blocking=True)
        if device.type in CHANNELS_LAST_DEVICES:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = model(x)  # (N, K, O, O), or a list of them with deep supervision
        loss = training_loss(logits if isinstance(logits, list) else logits.float(), y, w, dice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.item() * len(x)
        count += len(x)
    return total / max(count, 1)


def augmentation(cfg: TrainConfig) -> dict[str, Any]:
    """The keywords of :func:`octseg.unet.augment.augment` that ``cfg`` sets (used with ``cfg.augment``)."""
    return {"elastic": cfg.elastic, "sigma": cfg.elastic_sigma, "rotation": cfg.rotation, "scaling": cfg.scaling,
            "strength": cfg.jitter, "noise": cfg.noise, "blur": cfg.blur}


def _process_group() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed process group (``torchrun``), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """Tile-loading worker processes: ``cfg.num_workers``, else 0 on CPU (its cores run the network)
    and up to 4 on a GPU (they keep it fed)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return 0 if device.type == "cpu" else max(0, min(4, (os.cpu_count() or 1) - 1))


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (batch-norm statistics) with
    ``decay`` per update, or None when ``decay`` is 0. Its ``.module`` is the averaged network."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _state_on_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(
    model: torch.nn.Module,
    train: BScanSet,
    val: BScanSet | None,
    cfg: TrainConfig,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    *,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> list[EpochStats]:
    """Train ``model`` in place on random valid-padding tiles of ``train``; returns per-epoch stats.

    After every epoch ``on_checkpoint(state)`` receives everything needed to continue: model and
    optimiser state, the epoch, torch's RNG state, the history and the best epoch so far (tiles are
    drawn from generators seeded by (seed, epoch, tile), so they need no state). ``resume=state``
    continues from such a checkpoint and ends with the weights an uninterrupted run would have.
    With validation data, the weights of the epoch with the best foreground (class 1) Dice are restored
    at the end (``cfg.restore_best``), and ``cfg.patience`` epochs without improvement stop early.
    """
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    train = resample_set(train, model.config)  # as the network sees B-scans (validation stays as it is)
    if not cfg.border_weights:
        train = BScanSet(train.images, train.labels, None)  # w = 1: plain cross-entropy
    tile = training_tile(model.config, train.images.shape[1:], cfg)
    out = (model.output_size(tile[0]), model.output_size(tile[1]))
    dataset = TileDataset(train, tile, out, cfg.tiles_per_epoch, augment=cfg.augment, seed=cfg.seed,
                          foreground=cfg.foreground_fraction, augmentation=augmentation(cfg))
    rank, world = _process_group()
    if world > 1 and (cfg.batch_size % world or cfg.tiles_per_epoch % cfg.batch_size):
        raise ValueError(f"with {world} processes the batch ({cfg.batch_size}) must be a multiple of {world} and "
                         f"divide tiles_per_epoch ({cfg.tiles_per_epoch})")
    sampler = EpochSampler(cfg.tiles_per_epoch, rank, world)
    workers = loader_workers(cfg, device)
    loader = DataLoader(dataset, batch_size=cfg.batch_size // world, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        multiprocessing_context="spawn" if workers else None)  # no fork of a threaded process
    if device.type in CHANNELS_LAST_DEVICES:
        model.to(memory_format=torch.channels_last)  # faster convolutions (tensor cores; oneDNN on the CPU)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=cuda)  # torchrun: torch.cuda.set_device(LOCAL_RANK) first
    optimizer = make_optimizer(model, cfg)
    average = weight_average(model, cfg.ema)  # what is validated, kept and returned when on
    scored = average.module if average is not None else model
    inference = validation_inference(cfg)
    history: list[EpochStats] = []
    best: dict[str, Any] | None = None  # {"epoch", "dice", "model"} of the best validated epoch
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if average is not None:
            average.load_state_dict(resume["average"])
        torch.set_rng_state(resume["torch_rng"])
        history = [EpochStats(**h) for h in resume["history"]]
        best, start = resume["best"], cfg.epochs if resume.get("stopped") else resume["epoch"] + 1
        log.info("resuming after epoch %d", resume["epoch"])
    log.info("training on %s: %d B-scans, tiles %dx%d -> %dx%d, %s", device, len(train), *tile, *out, cfg)
    steps = len(loader)  # optimisation steps per epoch
    if cfg.ema and cfg.ema ** (cfg.epochs * steps) > EMA_START_SHARE:
        raise ValueError(f"ema {cfg.ema} over {cfg.epochs * steps} steps keeps {cfg.ema ** (cfg.epochs * steps):.0%} of the "
                         f"first steps' weights in the average: use a decay of at most "
                         f"{EMA_START_SHARE ** (1 / (cfg.epochs * steps)):.4f}, or train longer")
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        first = epoch * steps
        loss = _train_epoch(net, loader, optimizer, device, cfg.amp, cfg.dice_weight,
                            chunk=TILE_CHUNK if workers == 0 else 1,
                            lr_at=lambda i: cfg.lr * lr_factor(cfg.lr_schedule, first + i, cfg.epochs * steps),
                            after_step=(lambda: average.update_parameters(model)) if average is not None else None)
        if world > 1:  # the mean over every process's tiles
            on = device if torch.distributed.get_backend() == "nccl" else "cpu"
            total = torch.tensor([loss], dtype=torch.float64, device=on)
            torch.distributed.all_reduce(total)
            loss = float(total.item()) / world
        if not np.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} in epoch {epoch}; lower the learning rate")
        val_dice = evaluate(scored, val, inference) if val is not None and len(val) else {}
        stats = EpochStats(epoch, loss, time.perf_counter() - t0, val_dice)
        history.append(stats)
        log.info("epoch %d: loss %.4f, val dice %s", epoch, loss, val_dice)
        score = val_dice.get(1, float("nan"))
        if not np.isnan(score) and (best is None or score > best["dice"]):
            best = {"epoch": epoch, "dice": score, "model": _state_on_cpu(scored)}
        if on_epoch_end is not None:
            on_epoch_end(stats)
        stop = cfg.patience is not None and best is not None and epoch - best["epoch"] >= cfg.patience
        if world > 1:  # every process stops with rank 0
            flag = torch.tensor([int(stop)], device=device if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.broadcast(flag, 0)
            stop = bool(flag.item())
        if on_checkpoint is not None:
            on_checkpoint({"epoch": epoch, "model": _state_on_cpu(model), "optimizer": optimizer.state_dict(),
                           "torch_rng": torch.get_rng_state(), "history": [asdict(h) for h in history], "best": best,
                           "stopped": stop, "average": _state_on_cpu(average) if average is not None else None})
        if stop:
            log.info("stopping early after epoch %d: no better validation Dice since epoch %s", epoch,
                     best["epoch"] if best else "-")
            break
    if average is not None:
        model.load_state_dict(average.module.state_dict())
    if cfg.restore_best and best is not None:
        model.load_state_dict(best["model"])
        log.info("restored the weights of epoch %d (validation Dice %.4f)", best["epoch"], best["dice"])
    model.eval()
    return history
