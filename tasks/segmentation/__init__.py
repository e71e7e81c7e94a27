"""Segmentation: a registered U-Net over archive volumes, scored against manual labels, shown as pictures.

Owns: bulk inference into ``labels/prediction`` and the per-volume CSV (:mod:`.segment`), evaluation
on the annotated B-scans, its report and the champion choice on an evaluation set (:mod:`.evaluation`),
and the QC pictures (:mod:`.qc`, NumPy and Pillow only).

May import: :mod:`octseg.tasks.archive`, :mod:`octseg.tasks.preprocess`, :mod:`octseg.tasks.tracking`,
:mod:`octseg.tasks.runtime`, :mod:`octseg.unet`, Prefect.
"""
