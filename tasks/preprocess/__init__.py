"""Preprocessing: the derived arrays of a volume (normalised image, border-weight maps) and reading them back.

Owns: computing them Dask-parallel over shard-aligned blocks, with fingerprints so reruns skip what is
current (:mod:`.derive`), and the network's input as preprocessing left it (:mod:`.normalized`).

May import: :mod:`octseg.tasks.archive`, :mod:`octseg.tasks.runtime`, :mod:`octseg.unet`, Dask, Prefect.
"""
