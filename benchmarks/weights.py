"""Benchmark: fast vs brute-force U-Net border-weight maps (octseg.unet.weights).

Run from the repository root:  .venv/bin/python benchmarks/weights.py [--repeat N]

Cases: a seeded synthetic 512x512 phantom with ~125 blob instances, a handful of Duke DME fluid
masks and ISBI 2012 EM labels (both from <repo>/../shared/data; skipped with a message when absent).
Prints reference time, fast time (best of N, time.perf_counter), speed ratio, max abs error and the
instance count per case. Exits 1 when any case's error exceeds 0.01 (the speed ratio is reported,
and judged on the phantom in the last line, but never makes the script fail).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from octseg.unet.weights import border_weight_map, border_weight_map_reference

REPO = Path(__file__).resolve().parents[1]

SHARED_DATA = REPO.parent / "shared" / "data"
MAX_ERROR = 0.01
MIN_SPEEDUP = 100.0
DUKE_MASKS = (2, 3, 38, 47, 49)  # fluid masks with 13-15 pockets each
ISBI_LABELS = (0, 1)


@dataclass(frozen=True)
class Case:
    """One benchmark input: class map (H, W) and its instance map (or None = derived)."""

    name: str
    labels: np.ndarray
    instances: np.ndarray | None


def phantom(shape: tuple[int, int] = (512, 512), n_blobs: int = 125, seed: int = 0) -> np.ndarray:
    """Seeded instance map (H, W) int32 of random ellipses, radii 4-13 px; later blobs overwrite."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros(shape, dtype=np.int32)
    for ident in range(1, n_blobs + 1):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(4, 13, size=2)
        theta = rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(theta) + (xx - cx) * np.sin(theta)
        v = -(yy - cy) * np.sin(theta) + (xx - cx) * np.cos(theta)
        inst[(u / ry) ** 2 + (v / rx) ** 2 <= 1.0] = ident
    return inst


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def cases() -> Iterator[Case]:
    """The phantom first, then the real data that is present."""
    inst = phantom()
    yield Case("phantom 512x512", (inst > 0).astype(np.uint8), inst)
    if not SHARED_DATA.is_dir():
        print(f"(real data skipped: {SHARED_DATA} not found)")
        return
    for n in DUKE_MASKS:
        rgb = _read_png(SHARED_DATA / "duke_dme_fluid" / "masks" / f"img_{n}.png")
        yield Case(f"duke fluid img_{n}", (rgb.max(axis=-1) > 0).astype(np.uint8), None)
    for n in ISBI_LABELS:
        cells = (_read_png(SHARED_DATA / "isbi2012_em" / "labels" / f"{n}.png") == 255).astype(np.uint8)
        # 4-connected cells: 8-connectivity merges neighbouring cells through diagonal membrane gaps.
        yield Case(f"isbi labels {n}", cells, ndi.label(cells)[0])


def best_time(fn: Callable[..., np.ndarray], case: Case, repeat: int) -> tuple[float, np.ndarray]:
    """Best wall time (s) of ``fn(case.labels, case.instances)`` over ``repeat`` calls; last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(case.labels, case.instances)
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_case(case: Case, repeat: int) -> tuple[int, float, float, float]:
    """(instances, reference s, fast s, max abs error) of one case."""
    ref_s, ref = best_time(border_weight_map_reference, case, max(1, repeat // 2))
    fast_s, fast = best_time(border_weight_map, case, repeat)
    if case.instances is None:  # 8-connected components per class, as border_weight_map derives them
        eight = np.ones((3, 3), dtype=bool)
        n = sum(ndi.label(case.labels == c, structure=eight)[1] for c in np.unique(case.labels) if c)
    else:
        n = int(np.count_nonzero(np.unique(case.instances)))
    return n, ref_s, fast_s, float(np.max(np.abs(fast - ref)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="fast-version repeats (reference: repeat // 2)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    print(f"{'case':<20} {'inst':>5} {'ref ms':>9} {'fast ms':>8} {'ratio':>7} {'max err':>9}")
    failed, phantom_row = [], None
    for case in cases():
        n, ref_s, fast_s, err = run_case(case, args.repeat)
        ratio = ref_s / fast_s
        print(f"{case.name:<20} {n:>5} {ref_s * 1e3:>9.1f} {fast_s * 1e3:>8.2f} {ratio:>6.0f}x {err:>9.2e}")
        if err > MAX_ERROR:
            failed.append(case.name)
        if phantom_row is None:
            phantom_row = (ratio, err)
    ratio, err = phantom_row
    ok = ratio >= MIN_SPEEDUP and err <= MAX_ERROR
    print(f"phantom 512x512: speed-up {ratio:.0f}x (>= {MIN_SPEEDUP:.0f}x: {ratio >= MIN_SPEEDUP}), "
          f"max error {err:.2e} (<= {MAX_ERROR}: {err <= MAX_ERROR}) -> {'PASS' if ok else 'FAIL'}")
    if failed:
        print(f"error bound {MAX_ERROR} exceeded on: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
