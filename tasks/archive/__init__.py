"""The octseg archive: the one package that knows the on-disk Zarr layout.

An archive is a Zarr v3 group; each volume is an OME-NGFF 0.5 image written with ``ome_zarr``::

    <archive>/                      group, attrs {"octseg": {"archive_version": 1}}
      <volume_id>/                  OME-NGFF image group, attrs["octseg"] = provenance
        s0                          image (Z, Y, X) = (B-scan, depth, A-scan), dtype kept
        labels/                     OME "labels" group (plus the "version" ome-zarr omits)
          manual/s0                 uint8 ground truth, attrs octseg.annotated_bscans
          prediction/s0             uint8 segmentation, attrs octseg = model info + complete
        derived/<name>              plain (Z, Y, X) arrays, attrs octseg.complete + fingerprint
        boundaries                  vendor/grader layer boundaries, float32 (layer, Z, X): the row of
                                    each boundary per A-scan, NaN where none; attrs octseg.layers
        fundus/s0                   the SLO/NIR localizer of a vendor file, a 2-D OME image (y, x)

A volume's ``attrs["octseg"]`` also carries what a vendor file said that does not identify the
patient: ``laterality``, ``scan_pattern``, ``acquired`` (date), ``device``, reader ``warnings``;
patient identifiers only with ``--keep-identifiers`` (``identifiers``; see :mod:`octseg.tasks.ingest.identifiers`).

Every array is chunked one B-scan per chunk ``(1, Y, X)``, compressed (uint8: Blosc LZ4, bit-shuffled;
wider types: zstd level 1; :func:`~.layout.compressors_for`) and sharded ``(8, Y, X)`` (clipped to Z);
writers of derived arrays must align their Dask chunks to :meth:`~.store.Archive.shard_bscans`, since two
writers into one shard corrupt it. Axes are ``z, y, x`` in micrometres; the scale is 1.0 where the
source did not give it (``octseg.scale_known: false``). There is a single resolution level: OCT
volumes are small, and labels must have as many levels as their image (ome_zarr_models checks).

Nothing partial: volumes and predictions are built in a staging folder beside the archive
(``<parent>/.<archive name>.staging/<uuid>/``, same file system) and renamed into place; a replaced
folder is swapped with its successor in one atomic ``renameat2(RENAME_EXCHANGE)``. The staging
folders of killed writers are removed (and an interrupted replacement completed) by the next write. A
replaced volume loses its prediction and derived arrays, which belonged to the old image.

Modules: :mod:`.store` (``open_archive``, :class:`~.store.Archive`: every read and write),
:mod:`.layout` (constants, volume ids, checks, compressors, label metadata), :mod:`.ome` (the OME
groups of a volume), :mod:`.shards` (the fast shard writer), :mod:`.staging` (atomic replacement),
:mod:`.claims` (one run per volume at a time), :mod:`.classes` (label names and colours).

May import: zarr, ome-zarr, Dask, numcodecs; :mod:`octseg.tasks.readers.registry` (the suffixes a
volume id leaves out, and each reader's options a catalogue row records), :mod:`octseg.tasks.runtime.processes`
and :mod:`octseg.tasks.runtime.memory`. Nothing else of octseg; no Prefect.
This ``__init__`` imports nothing, so :mod:`.classes` stays free of zarr for the QC pictures.
"""
