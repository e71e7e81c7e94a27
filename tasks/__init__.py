"""Units of work on scans and the archive: plain functions with thin Prefect ``@task`` wrappers.

Sub-packages, each owning one concern (its ``__init__`` says what it may import):

* :mod:`.readers` - scan files and vendor exports -> ``ScanVolume`` (one registry of formats)
* :mod:`.archive` - the OME-Zarr archive: layout, atomic writes, claims, label classes
* :mod:`.ingest` - one source -> one archive volume; masks, identifiers, the inbox
* :mod:`.preprocess` - derived arrays (normalised image, weight maps) and reading them back
* :mod:`.training` - training data from the archive; training, registering, resuming a U-Net
* :mod:`.segmentation` - bulk inference, evaluation against manual labels, QC pictures
* :mod:`.tracking` - MLflow: the tracking URI, registered models, the champion
* :mod:`.runtime` - Dask clusters, retries, progress bars, process liveness
* :mod:`.synthetic` - phantom OCT volumes for the demo, tests and benchmarks

Layers: ``octseg.flows`` imports ``octseg.tasks``, which imports ``octseg.unet``; never the reverse.
"""
