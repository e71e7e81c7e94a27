"""Scan files -> :class:`~octseg.tasks.readers.base.ScanVolume`: one module a format family, one registry of them.

Owns every file format octseg reads: :mod:`.registry` lists the readers and dispatches
(``read_volume``); :mod:`.base` holds the ``Reader`` protocol, ``ScanVolume``, ``ReadError`` and the
voxel limit; :mod:`.sources` checks, orders and hashes source paths; :mod:`.headers` converts what
vendor headers say. Formats: :mod:`.images` (TIFF, PNG/JPEG, ``.npy``, folders of B-scans; a TIFF's pages checked by
:mod:`.tiff`),
:mod:`.heidelberg` (``.vol``, ``.e2e``), :mod:`.heyex_xml`, :mod:`.dicom`, :mod:`.duke` and
:mod:`.octconverter` (Topcon, Zeiss, Bioptigen).

May import: NumPy, tifffile, Pillow, and inside the functions that read a file eyepy, pydicom, h5py,
SciPy and oct-converter. Imports no other ``octseg`` package (no archive, no Prefect): the archive,
ingest and the flows import it. This ``__init__`` imports nothing, so ``readers.limits`` and
``readers.sources`` stay free for the command's start-up.
"""
