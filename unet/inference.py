"""Run a U-Net over B-scans and volumes: whole B-scans per forward pass, tiles only when they must.

A valid-padding U-Net can take any valid *rectangular* input, so a B-scan plus its halo goes through
the network in one pass (mirror-padded to the smallest valid input whose output covers it) whenever
that pass fits a memory budget; several B-scans go in one batch when the budget holds them. Larger
images fall back to the overlap-tile strategy of :func:`octseg.unet.tiling.predict_tiled`, with tiles
placed at multiples of the network's stride ``2 ** depth``.

The rule that makes both paths agree: with valid convolutions and 2x2 poolings, a pixel's output
depends only on the input around it, and is the same wherever a tile places it as long as tiles move
by multiples of ``2 ** depth`` (the pooling grid stays aligned). The whole pass is such a placement,
so where both apply the tiled probabilities equal the whole pass's to float tolerance (blending
averages identical values; ``tests/unet/test_inference.py`` checks it). With ``padding="same"`` the
zero padding at tile borders breaks this; there the two agree only away from tile seams.

:func:`segment_bscans` pipelines a volume: a reader thread loads and normalises the next B-scans, the
calling thread runs the network, a writer thread stores finished labels, with bounded queues between
them, so memory stays flat for volumes of any depth.
"""
from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from octseg.unet.config import InferenceConfig, PostprocessConfig, UNetConfig
from octseg.unet.postprocess import postprocess
from octseg.unet.prefetch import threaded as _threaded
from octseg.unet.resample import is_resampled, resample_images, resample_probabilities, scaled_size
from octseg.unet.model import choose_tile_size, nearest_valid_input_size, output_size
from octseg.unet.tiling import mirror_pad, predict_tiled

__all__ = [
    "CHANNELS_LAST_DEVICES",
    "InferencePlan",
    "activation_bytes",
    "covering_input",
    "memory_budget",
    "plan_inference",
    "predict_probabilities",
    "resolve_device",
    "segment_bscans",
    "segment_volume",
    "torch_predictor",
    "uses_tta",
]

CPU_BUDGET_MB = 2048  # default memory for one forward pass on the CPU
# most B-scans per pass when the budget would allow more; on CPU one: a batch of 4 whole 496 x 768 B-scans
# measured 28% slower per B-scan than one at a time (benchmarks/segment.py tries 1, 2, 4)
MAX_BATCH = {"cpu": 1, "cuda": 64}
# devices whose convolutions run faster on NHWC (channels_last) tensors: tensor cores on CUDA; oneDNN on the CPU,
# where the recipes' network trains in 0.75x and infers a B-scan in 0.64x the time, the paper's 64-channel one
# in 0.92x and 0.87x (benchmarks/layout.py)
CHANNELS_LAST_DEVICES = ("cuda", "cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; an explicit ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False")
    return device


@functools.lru_cache(maxsize=256)
def covering_input(n: int, depth: int, padding: str) -> int:
    """The smallest valid input size whose output covers ``n`` pixels (``n`` plus the halo, rounded up
    to a valid size). ``covering_input(496, 4, "valid")`` is 684 (output 500)."""
    m = nearest_valid_input_size(max(n, 1), depth, padding)[1]
    while output_size(m, depth, padding) < n:
        m = nearest_valid_input_size(m + 1, depth, padding)[1]
    return m


def activation_bytes(config: UNetConfig, input_hw: tuple[int, int], batch: int = 1, amp: bool = False) -> int:
    """Estimated peak memory of one inference forward pass (no gradients) on ``batch`` inputs.

    The skip map of every level stays alive until the expanding path uses it; on top of them the
    decoder's first level holds its up-convolution, the concatenation (twice the channels) and a
    convolution output at full resolution. Element size 4 (2 under bf16 autocast). A deliberate
    overestimate (about 1.5x what CPU inference measures in ``benchmarks/segment.py``).
    """
    h, w = input_hw
    area = float(h) * w
    skips = sum(config.base_channels * 2**level * area / 4**level for level in range(config.depth + 1))
    working = 5 * config.base_channels * area + config.in_channels * area + config.out_channels * area
    return int((2 if amp else 4) * batch * (skips + working))


def memory_budget(cfg: InferenceConfig, device: torch.device) -> int:
    """Bytes one forward pass may use: ``cfg.memory_budget_mb``, else half the free memory of the GPU,
    else :data:`CPU_BUDGET_MB`."""
    if cfg.memory_budget_mb is not None:
        return cfg.memory_budget_mb * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return CPU_BUDGET_MB * 2**20


@dataclass(frozen=True)
class InferencePlan:
    """How B-scans of one shape go through the network."""

    whole: bool  # True: one pass per B-scan (mirror-padded to tile_in); False: overlap-tiles
    tile_in: tuple[int, int]  # network input per B-scan (whole) or per tile
    tile_out: tuple[int, int]
    batch: int  # B-scans (whole) or tiles per forward pass
    align: int  # tile starts are multiples of this: the network's stride


def _axis_tile(n: int, config: UNetConfig, max_tile: int) -> int:
    """Input tile along an axis of ``n`` pixels: the whole axis when that fits ``max_tile``, else the
    largest valid input <= ``max_tile`` whose output fits inside ``n`` (the training tile rule)."""
    whole = covering_input(n, config.depth, config.padding)
    if whole <= max_tile:
        return whole
    return choose_tile_size(config, (n, n), max_tile)


def plan_inference(config: UNetConfig, image_hw: tuple[int, int], cfg: InferenceConfig, budget: int,
                   device_type: str = "cpu") -> InferencePlan:
    """Whole B-scans when one fits ``budget`` (and ``cfg.whole``, and no ``cfg.tile_size``), else tiles:
    rectangular when one axis fits ``cfg.max_tile`` whole, square ``cfg.tile_size`` when it is given.
    The batch is ``cfg.batch_size``, or as many as ``budget`` holds (at most :data:`MAX_BATCH`)."""
    h, w = image_hw
    stride = 2**config.depth
    if min(h, w) < stride:
        raise ValueError(f"B-scans of {h}x{w} pixels are smaller than the network's stride ({stride} pixels, "
                         f"depth {config.depth}); there is nothing a U-Net can segment in them")
    d, p = config.depth, config.padding
    whole_in = (covering_input(h, d, p), covering_input(w, d, p))
    one = activation_bytes(config, whole_in, amp=cfg.amp)
    if cfg.whole and cfg.tile_size is None and one <= budget:
        tile_in, whole = whole_in, True
    elif cfg.tile_size is not None:
        tile_in, whole = (cfg.tile_size, cfg.tile_size), False
    else:
        tile_in, whole = (_axis_tile(h, config, cfg.max_tile), _axis_tile(w, config, cfg.max_tile)), False
    tile_out = (output_size(tile_in[0], d, p), output_size(tile_in[1], d, p))
    if cfg.batch_size is not None:
        batch = cfg.batch_size
    else:
        cap = MAX_BATCH.get(device_type, MAX_BATCH["cpu"])
        batch = int(max(1, min(cap, budget // max(1, activation_bytes(config, tile_in, amp=cfg.amp)))))
    return InferencePlan(whole, tile_in, tile_out, batch, stride)


class _Network:
    """The model as ``probabilities(batch (N, C, th, tw) float32) -> (N, K, oh, ow) float32`` on its device:
    inference mode, bf16 autocast under ``amp`` on CUDA, channels_last on CUDA and the CPU, pinned,
    non-blocking copies on CUDA, optionally ``torch.compile``d."""

    def __init__(self, model: torch.nn.Module, cfg: InferenceConfig) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.amp = cfg.amp and self.cuda
        self.channels_last = self.device.type in CHANNELS_LAST_DEVICES
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    def _logits(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.forward(x)

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return torch.softmax(self._logits(batch).float(), dim=1).cpu().numpy()

    @torch.inference_mode()
    def labels(self, batch: np.ndarray) -> np.ndarray:
        """Arg-max labels uint8 (N, oh, ow), computed on the device (only labels cross to the host)."""
        return self._logits(batch).argmax(1).to(torch.uint8).cpu().numpy()


def torch_predictor(model: torch.nn.Module, device: torch.device | None = None,
                    amp: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap ``model`` as ``f(batch float32 (N, C, T, T)) -> softmax probabilities float32 (N, K, O, O)``."""
    if device is not None:
        model.to(device)
    return _Network(model, InferenceConfig(amp=amp))


def _check_finite(images: np.ndarray, first: int) -> None:
    bad = ~np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if bad.any():
        which = [first + int(i) for i in np.flatnonzero(bad)]
        raise ValueError(f"B-scan(s) {which[:5]}{' ...' if len(which) > 5 else ''} hold NaN or infinite values")


def _whole_passes(images: np.ndarray, plan: InferencePlan, step: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``step`` over batches of whole B-scans (N, C, H, W), each mirror-padded to ``plan.tile_in``;
    the outputs cropped back to (H, W) and concatenated."""
    h, w = images.shape[-2:]
    halo = ((plan.tile_in[0] - plan.tile_out[0]) // 2, (plan.tile_in[1] - plan.tile_out[1]) // 2)
    pad = ((halo[0], plan.tile_in[0] - h - halo[0]), (halo[1], plan.tile_in[1] - w - halo[1]))
    out = [step(mirror_pad(images[i : i + plan.batch], pad))[..., :h, :w] for i in range(0, len(images), plan.batch)]
    return np.concatenate(out)


def _probabilities(net: _Network, images: np.ndarray, plan: InferencePlan, cfg: InferenceConfig) -> np.ndarray:
    """Class probabilities float32 (N, K, H, W) of normalised B-scans (N, H, W) (or (N, C, H, W))."""
    chw = images if images.ndim == 4 else images[:, None]
    if plan.whole:
        return _whole_passes(chw, plan, net)
    return np.stack([predict_tiled(image, net, plan.tile_in, overlap=cfg.overlap, batch_size=plan.batch,
                                   output_tile=plan.tile_out, align=plan.align) for image in chw])


def uses_tta(model: torch.nn.Module, cfg: InferenceConfig) -> bool:
    """``cfg.tta`` when set, else the model's own choice (``model.tta``: a cross-validation ensemble was
    scored with test-time flips and predicts with them); False for a model that says nothing."""
    return cfg.tta if cfg.tta is not None else bool(getattr(model, "tta", False))


def _predict(net: _Network, images: np.ndarray, plan: InferencePlan, cfg: InferenceConfig) -> np.ndarray:
    """Class probabilities (N, K, H, W) of B-scans (N, H, W); a network that sees B-scans resampled
    (``scale_y``/``scale_x``) gets them so, and its probabilities come back at (H, W)."""
    hw = images.shape[-2:]
    small = scaled_size(net.model.config, hw)
    x = resample_images(images, small) if small != tuple(hw) else images
    probs = _probabilities(net, x, plan, cfg)
    if uses_tta(net.model, cfg):  # the mirrored B-scan's probabilities, mirrored back
        probs = 0.5 * (probs + _probabilities(net, x[..., ::-1].copy(), plan, cfg)[..., ::-1])
    return resample_probabilities(probs, hw)


def _plan_for(model: torch.nn.Module, image_hw: tuple[int, int], cfg: InferenceConfig) -> InferencePlan:
    """The plan for B-scans of ``image_hw`` as the network sees them (resampled when it is)."""
    device = next(model.parameters()).device
    return plan_inference(model.config, scaled_size(model.config, image_hw), cfg, memory_budget(cfg, device),
                          device.type)


def predict_probabilities(
    model: torch.nn.Module, image: np.ndarray, cfg: InferenceConfig = InferenceConfig()
) -> np.ndarray:
    """Class probabilities float32 (K, H, W) for one normalised B-scan (H, W), on the model's device."""
    image = np.asarray(image, dtype=np.float32)
    _check_finite(image[None], 0)
    return _predict(_Network(model, cfg), image[None], _plan_for(model, image.shape[-2:], cfg), cfg)[0]


_DONE = object()


def segment_bscans(
    model: torch.nn.Module,
    read: Callable[[int, int], np.ndarray],
    n_bscans: int,
    write: Callable[[int, np.ndarray], None],
    cfg: InferenceConfig = InferenceConfig(),
    *,
    chunk: int = 8,
    image_hw: tuple[int, int],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Arg-max labels of B-scans ``0 .. n_bscans - 1``, chunk by chunk, with I/O overlapped, post-processed
    as the model says (``model.postprocess``, chosen with it; per B-scan, so chunks do not matter).

    ``read(z0, z1)`` returns normalised float32 B-scans (z1 - z0, H, W); ``write(z0, labels)`` receives
    their uint8 labels. Reading runs one chunk ahead in a thread, writing one chunk behind in another;
    at most ~4 chunks are in memory at any time. An error in any of the three stops all and is raised.
    """
    net = _Network(model, cfg)
    plan = _plan_for(model, image_hw, cfg)
    resampled = is_resampled(model.config)
    chunk = max(1, chunk)
    if plan.whole:  # whole shards at a time, as many as one batch needs: a batch never waits for a short chunk
        chunk *= -(-plan.batch // chunk)
    starts = range(0, n_bscans, chunk)

    def chunks() -> Iterator[tuple[int, np.ndarray]]:
        for z0 in starts:
            images = np.asarray(read(z0, min(z0 + chunk, n_bscans)), dtype=np.float32)
            _check_finite(images, z0)
            yield z0, images

    after = getattr(model, "postprocess", PostprocessConfig())

    def labelled() -> Iterator[tuple[int, np.ndarray]]:
        for z0, images in _threaded(chunks(), depth=2):
            if plan.whole and not uses_tta(model, cfg) and not resampled:  # the arg-max on the device: no probabilities cross
                labels = _whole_passes(images if images.ndim == 4 else images[:, None], plan, net.labels)
            else:
                labels = _predict(net, images, plan, cfg).argmax(1).astype(np.uint8)
            yield z0, postprocess(labels, after)

    done = 0
    writes = _Writer(write)
    try:
        for z0, labels in labelled():
            writes.put(z0, labels)
            done += len(labels)
            if progress is not None:
                progress(done, n_bscans)
    except BaseException:
        writes.close(raise_error=False)  # the error in flight is the one to report
        raise
    writes.close()


class _Writer:
    """``write(z0, labels)`` in a background thread, one chunk behind; ``close`` waits and re-raises."""

    def __init__(self, write: Callable[[int, np.ndarray], None]) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(write,), name="octseg-writer", daemon=True)
        self.thread.start()

    def _run(self, write: Callable[[int, np.ndarray], None]) -> None:
        while (item := self.q.get()) is not _DONE:
            if self.error is None:
                try:
                    write(*item)
                except BaseException as e:  # noqa: BLE001 - re-raised by put/close
                    self.error = e

    def put(self, z0: int, labels: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((z0, labels))

    def close(self, raise_error: bool = True) -> None:
        self.q.put(_DONE)
        self.thread.join()
        if raise_error and self.error is not None:
            raise self.error


def segment_volume(
    model: torch.nn.Module,
    volume: np.ndarray,
    cfg: InferenceConfig = InferenceConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Arg-max labels uint8 (Z, H, W) of a normalised (Z, H, W) volume held in memory."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a (Z, H, W) volume, got shape {volume.shape}")
    out = np.empty(volume.shape, dtype=np.uint8)

    def write(z0: int, labels: np.ndarray) -> None:
        out[z0 : z0 + len(labels)] = labels

    segment_bscans(model, lambda a, b: volume[a:b], len(volume), write, cfg, image_hw=volume.shape[1:],
                   progress=progress)
    return out
