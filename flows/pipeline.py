"""Flow ``octseg-pipeline``: ingest -> preprocess -> train -> segment, each a sub-flow."""
from __future__ import annotations

from prefect import flow, get_run_logger

from octseg.flows.config import PipelineConfig
from octseg.flows.ingest import ingest_volumes
from octseg.flows.preprocess import preprocess_archive
from octseg.flows.segment import segment_archive
from octseg.flows.summary import PipelineSummary
from octseg.flows.train import train_unet

__all__ = ["run_pipeline"]


@flow(name="octseg-pipeline")
def run_pipeline(config: PipelineConfig) -> PipelineSummary:
    """Files in, segmented archive and registered model out."""
    ingested = ingest_volumes(config.ingest)
    preprocessed = preprocess_archive(config.preprocess)
    trained = train_unet(config.train)
    segmented = segment_archive(config.segment)
    summary = PipelineSummary(ingested, preprocessed, trained, segmented)
    get_run_logger().info("pipeline done:\n%s", summary.headline())
    return summary
