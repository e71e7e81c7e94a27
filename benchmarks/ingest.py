"""P3: ingest throughput against a raw sequential write of the same bytes, measured in one run.

A 200 x 496 x 768 uint8 volume (Duke DME Subject_01's 61 B-scans repeated, when ../shared/data is
there; else a phantom of that shape) is saved as a ``.npy`` (and a TIFF with ``--tiff``). Each round
times, in alternating order:

* raw: writing the volume's bytes to a new file (``open().write()``, as a copy would; no fsync);
* ingest: :func:`octseg.tasks.ingest.source.ingest_source` of the file into a new archive (SHA-256, header
  checks, decode, compressed sharded OME-Zarr write in a staging folder, rename into place); no
  Prefect, so this is the work each ingest task does. The compressor is the archive's for the
  volume's dtype (``octseg.tasks.archive.layout.compressors_for``, printed with the result).

P3 = ingest MB/s / raw MB/s (per round; the median is reported). Goal >= 0.5.

    .venv/bin/python benchmarks/ingest.py [--rounds 5] [--tiff]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from octseg.tasks.archive.layout import compressors_for
from octseg.tasks.ingest.source import ingest_source

SUBJECT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "duke_dme_subject01_volume"


def make_volume(n: int = 200) -> tuple[np.ndarray, str]:
    if SUBJECT.is_dir():
        from PIL import Image

        bscans = [np.asarray(Image.open(SUBJECT / f"Subject_01_{i}.png").convert("L")) for i in range(1, 62)]
        return np.stack([bscans[i % len(bscans)] for i in range(n)]), "Duke Subject_01 B-scans"
    from octseg.tasks.synthetic.phantom import make_phantom_volume

    return make_phantom_volume(n, 496, 768, seed=0).image, "phantom"


def raw_write(volume: np.ndarray, path: Path) -> float:
    t = time.perf_counter()
    with path.open("wb") as fh:
        fh.write(volume.tobytes())
    return time.perf_counter() - t


def ingest(source: Path, archive: Path) -> float:
    t = time.perf_counter()
    result = ingest_source(source, archive)
    elapsed = time.perf_counter() - t
    assert result.status == "written", result
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiff", action="store_true", help="also ingest the volume as a TIFF stack")
    args = parser.parse_args()
    volume, what = make_volume()
    mb = volume.nbytes / 1e6
    with tempfile.TemporaryDirectory(prefix="octseg-bench-") as tmp:
        tmp = Path(tmp)
        sources = {"npy": tmp / "volume.npy"}
        np.save(sources["npy"], volume)
        if args.tiff:
            import tifffile

            sources["tiff"] = tmp / "volume.tif"
            tifffile.imwrite(sources["tiff"], volume, photometric="minisblack")
        codec = ", ".join(f"{c.to_dict()['name']} {c.to_dict().get('configuration', {})}" for c in compressors_for(volume.dtype))
        print(f"{what}: {volume.shape} {volume.dtype}, {mb:.1f} MB per ingest")
        ingest(sources["npy"], tmp / "warm.zarr")  # imports, first zarr/codec set-up
        for kind, source in sources.items():
            ratios, rates = [], []
            for r in range(args.rounds):
                archive, raw = tmp / f"{kind}{r}.zarr", tmp / f"raw{r}.bin"
                if r % 2:
                    t_ingest, t_raw = ingest(source, archive), raw_write(volume, raw)
                else:
                    t_raw, t_ingest = raw_write(volume, raw), ingest(source, archive)
                rates.append((mb / t_raw, mb / t_ingest))
                ratios.append(t_raw / t_ingest)
                shutil.rmtree(archive)
                raw.unlink()
                print(f"  {kind} round {r}: raw {mb / t_raw:6.0f} MB/s, ingest {mb / t_ingest:6.0f} MB/s, "
                      f"ratio {ratios[-1]:.2f}")
            stored = sum(f.stat().st_size for f in (tmp / "warm.zarr").rglob("*") if f.is_file()) / 1e6
            print(f"P3 ({kind}) = {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f}; "
                  f"ingest median {statistics.median(r[1] for r in rates):.0f} MB/s, raw "
                  f"{statistics.median(r[0] for r in rates):.0f} MB/s; stored {stored:.1f} MB with {codec}); "
                  f"goal >= 0.5")


if __name__ == "__main__":
    main()
