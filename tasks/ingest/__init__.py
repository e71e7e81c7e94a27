"""Ingest: one source (file, export or folder of B-scans) -> one archive volume, and the drop folder.

Owns: the ingest of a source and its Prefect task (:mod:`.source`), the rules for a volume the archive
already holds (:mod:`.rules`), manual masks beside a source (:mod:`.masks`), patient identifiers kept
out of the archive (:mod:`.identifiers`) and the inbox scan (:mod:`.inbox`).

May import: :mod:`octseg.tasks.readers`, :mod:`octseg.tasks.archive`, :mod:`octseg.tasks.runtime`, Prefect.
"""
