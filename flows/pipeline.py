"""Flow ``octseg-pipeline``: ingest -> preprocess -> train -> segment, each a sub-flow."""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import State

from octseg.flows.config import PipelineConfig
from octseg.flows.ingest import ingest_volumes
from octseg.flows.preprocess import preprocess_archive
from octseg.flows.runs import finish, summary_of
from octseg.flows.segment import segment_archive
from octseg.flows.summary import PipelineSummary
from octseg.flows.train import train_unet

__all__ = ["run_pipeline"]


@flow(name="octseg-pipeline")
def run_pipeline(config: PipelineConfig) -> State:
    """Files in, segmented archive and registered model out; a stage with failed items lets the next
    stages go on with what succeeded, and the pipeline run then ends Failed."""
    ingested = summary_of(ingest_volumes(config.ingest, return_state=True))
    preprocessed = summary_of(preprocess_archive(config.preprocess, return_state=True))
    trained = train_unet(config.train)
    segmented = summary_of(segment_archive(config.segment, return_state=True))
    summary = PipelineSummary(ingested, preprocessed, trained, segmented)
    get_run_logger().info("pipeline done:\n%s", summary.headline())
    return finish(summary)
