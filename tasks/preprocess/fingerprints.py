"""What a derived array must record to be up to date: plain data, no Zarr, Dask or Prefect (the plans read it)."""
from __future__ import annotations

from octseg.unet.config import WeightMapConfig

__all__ = ["NORMALIZATION_METHOD", "expected_fingerprints"]

NORMALIZATION_METHOD = "zscore-excluding-fill-v1"


def expected_fingerprints(source_sha256: str | None, labels_fp: str | None, weights: WeightMapConfig, *,
                          manual: bool) -> dict[str, dict]:
    """The fingerprint each derived array must carry to be up to date: ``normalized`` from the source's sha256,
    ``weights`` (volumes with manual labels) from the labels' fingerprint and the weight-map settings."""
    fps = {"normalized": {"source_sha256": source_sha256, "method": NORMALIZATION_METHOD}}
    if manual:
        fps["weights"] = {"labels_sha256": labels_fp, "w0": weights.w0, "sigma": weights.sigma,
                          "class_weights": weights.class_weights}
    return fps
