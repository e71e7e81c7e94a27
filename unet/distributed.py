"""Data-parallel training in ``processes`` worker processes, launched from the calling process.

:func:`fit_distributed` is :func:`octseg.unet.train.fit` spread over N processes with
DistributedDataParallel: one per GPU with the NCCL backend (process r trains on ``cuda:r``), or N CPU
processes with gloo (for tests and for machines without GPUs). The caller stays the only process
that talks to the outside world: rank 0 sends every epoch's stats and checkpoint back through a
queue and the caller hands them to its own ``on_epoch_end`` / ``on_checkpoint`` (so an MLflow run
opened by the caller records them, exactly as in single-process training). The other ranks only
train. At the end the caller's ``model`` holds rank 0's final weights.

This is what ``torchrun --nproc-per-node N`` would do on one node, without a second command: the
``octseg train --gpus N`` option. Under an external ``torchrun`` (a process group already exists),
call :func:`fit` directly.
"""
from __future__ import annotations

import io
import os
import queue
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from octseg.unet.bscans import BScanSet
from octseg.unet.config import TrainConfig, UNetConfig
from octseg.unet.train import EpochStats, fit

__all__ = ["fit_distributed", "rank_device"]


def rank_device(device: str, rank: int) -> tuple[str, str]:
    """(torch device, backend) of process ``rank``: ``cuda:rank`` with NCCL when ``device`` is CUDA
    (or ``auto`` with CUDA present), else the CPU with gloo."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return (f"cuda:{rank}", "nccl") if cuda else ("cpu", "gloo")


def _check_devices(cfg: TrainConfig, processes: int) -> None:
    device, _ = rank_device(cfg.device, 0)
    if device.startswith("cuda"):
        if cfg.device not in ("auto", "cuda"):
            raise ValueError(f"with {processes} processes each takes one GPU (cuda:0 ... cuda:{processes - 1}); "
                             f"use --device cuda or auto, not {cfg.device!r}")
        found = torch.cuda.device_count()
        if found < processes:
            raise ValueError(f"{processes} training processes need {processes} GPUs; {found} found")
    elif cfg.device not in ("auto", "cpu"):
        raise ValueError(f"multi-process training runs on CUDA (nccl) or the CPU (gloo), not {cfg.device!r}")


def _pack(obj: Any) -> bytes:
    """``obj`` as bytes: tensors sent through a queue as shared memory would die with the process that sent them."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _worker(rank: int, world: int, rendezvous: str, unet: dict, state: dict, train: BScanSet, val: BScanSet | None,
            cfg: dict, resume: dict | None, out: Any, threads: int) -> None:
    import torch.distributed as dist

    from octseg.unet.model import UNet

    device, backend = rank_device(cfg["device"], rank)
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: never an interface the host name resolves to
        torch.set_num_threads(threads)
    else:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model = UNet.from_config(UNetConfig.from_dict(unet))
        model.load_state_dict(state)
        config = TrainConfig.from_dict({**cfg, "device": device})
        lead = rank == 0
        history = fit(model, train, val, config,
                      on_epoch_end=(lambda s: out.put(("epoch", _pack(asdict(s))))) if lead else None,
                      on_checkpoint=(lambda c: out.put(("checkpoint", _pack(c)))) if lead else None,
                      resume=resume)
        if lead:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            out.put(("done", _pack({"model": weights, "history": [asdict(h) for h in history]})))
        dist.barrier()  # nobody tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def fit_distributed(
    model: torch.nn.Module,
    train: BScanSet,
    val: BScanSet | None,
    cfg: TrainConfig,
    processes: int,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    *,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> list[EpochStats]:
    """:func:`octseg.unet.train.fit` in ``processes`` DistributedDataParallel processes (see module doc).

    ``model``'s current weights are every process's start; the global batch is ``cfg.batch_size`` (each
    process takes ``batch_size / processes`` tiles of it), so the loss curve follows one process's with
    the same settings. A worker that fails makes this raise ``RuntimeError`` naming its exit code.
    """
    if processes < 2:
        return fit(model, train, val, cfg, on_epoch_end, on_checkpoint=on_checkpoint, resume=resume)
    _check_devices(cfg, processes)
    if cfg.batch_size % processes or cfg.tiles_per_epoch % cfg.batch_size:
        raise ValueError(f"with {processes} processes the batch ({cfg.batch_size}) must be a multiple of {processes} "
                         f"and divide tiles_per_epoch ({cfg.tiles_per_epoch})")
    ctx = mp.get_context("spawn")  # never fork a process that holds threads (Prefect, MLflow, BLAS)
    out = ctx.Queue()
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    threads = max(1, torch.get_num_threads() // processes)
    result: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="octseg-ddp-") as tmp:
        rendezvous = str(Path(tmp) / "rendezvous")
        args = (processes, rendezvous, model.config.to_dict(), state, train, val, cfg.to_dict(), resume, out, threads)
        context = mp.start_processes(_worker, args=args, nprocs=processes, join=False, start_method="spawn")
        def handle(kind: str, packed: bytes) -> None:
            nonlocal result
            payload = _unpack(packed)
            if kind == "epoch" and on_epoch_end is not None:
                on_epoch_end(EpochStats(**payload))
            elif kind == "checkpoint" and on_checkpoint is not None:
                on_checkpoint(payload)
            elif kind == "done":
                result = payload

        try:
            finished = False
            while not finished:
                try:
                    handle(*out.get(timeout=1.0))
                except queue.Empty:
                    finished = context.join(timeout=0)  # every worker ended (raises when one failed)
            while True:  # what the workers flushed just before they ended
                try:
                    handle(*out.get(timeout=0.1))
                except queue.Empty:
                    break
        except mp.ProcessRaisedException as e:
            raise RuntimeError(f"a training process failed: {str(e).strip().splitlines()[-1]}") from None
        except mp.ProcessExitedException as e:
            raise RuntimeError(f"training process {e.error_index} exited with code {e.exit_code}") from None
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
    if result is None:
        raise RuntimeError("the training processes ended without returning weights")
    model.load_state_dict(result["model"])
    model.eval()
    return [EpochStats(**h) for h in result["history"]]
