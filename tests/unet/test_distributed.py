"""DistributedDataParallel on CPU: 2 processes with the gloo backend train like 1 process with the same
global batch (the same tiles per step, gradients averaged), within float tolerance."""
from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from octseg.tasks.synthetic.phantom import make_phantom_volume
from octseg.unet.bscans import BScanSet
from octseg.unet.config import TrainConfig
from octseg.unet.model import UNet
from octseg.unet.normalize import normalize_volume
from octseg.unet.train import fit

CFG = TrainConfig(epochs=3, batch_size=4, tiles_per_epoch=8, optimizer="sgd", lr=0.01, momentum=0.9, max_tile=64,
                  restore_best=False, device="cpu")


def _data() -> BScanSet:
    ph = make_phantom_volume(n_bscans=3, height=64, width=80, seed=4)
    return BScanSet(normalize_volume(ph.image), ph.fluid.astype(np.int64))


def _train(out: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = UNet(base_channels=4, depth=2)
    history = fit(model, _data(), None, CFG)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(model.state_dict(), out / "weights.pt")
        (out / "losses.json").write_text(json.dumps([h.train_loss for h in history]))


def _worker(rank: int, world: int, folder: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback: never an interface the host name happens to resolve to
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        _train(Path(folder) / "ddp")
        gc.collect()  # the DDP wrapper and its reducer go before the group does
        dist.barrier()  # nobody tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_follow_the_single_process_loss_curve(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "ddp").mkdir()
    _train(tmp_path / "one")
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "losses.json").read_text())
    np.testing.assert_allclose(ddp, one, rtol=1e-4)
    a = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "weights.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)


def test_fit_distributed_launches_the_processes_and_reports_to_the_caller(tmp_path: Path) -> None:
    """``octseg train --gpus/--processes N``: the caller spawns N gloo processes, gets every epoch's stats and
    checkpoint from rank 0 (for its MLflow run) and ends with the weights of one process's training."""
    from octseg.unet.distributed import fit_distributed

    torch.manual_seed(0)
    torch.set_num_threads(1)
    one = UNet(base_channels=4, depth=2)
    ddp = UNet(base_channels=4, depth=2)
    ddp.load_state_dict(one.state_dict())
    single = fit(one, _data(), None, CFG)
    epochs, checkpoints = [], []
    history = fit_distributed(ddp, _data(), None, CFG, 2, epochs.append, on_checkpoint=checkpoints.append)
    assert [h.epoch for h in history] == [e.epoch for e in epochs] == [c["epoch"] for c in checkpoints] == [0, 1, 2]
    np.testing.assert_allclose([h.train_loss for h in history], [h.train_loss for h in single], rtol=1e-4)
    for key, value in one.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[key], value, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(checkpoints[-1]["model"][key], ddp.state_dict()[key])


def test_fit_distributed_refuses_a_batch_it_cannot_split() -> None:
    import pytest

    from octseg.unet.distributed import fit_distributed

    with pytest.raises(ValueError, match="multiple of 3"):
        fit_distributed(UNet(base_channels=4, depth=2), _data(), None, CFG, 3)
    with pytest.raises(ValueError, match="cuda"):
        fit_distributed(UNet(base_channels=4, depth=2), _data(), None, TrainConfig(device="cuda:1"), 2)
