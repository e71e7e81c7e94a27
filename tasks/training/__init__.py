"""Training: annotated B-scans of the archive -> a U-Net trained, registered and maybe promoted in MLflow.

Owns: the training and validation sets (:mod:`.dataset`), one training run with its fingerprint, MLflow
logging and Prefect task (:mod:`.train`), cross-validation by subject registered as one ensemble with
its out-of-fold scores (:mod:`.crossval`), and continuing an unfinished run from its checkpoint
(:mod:`.resume`).

May import: :mod:`octseg.tasks.archive`, :mod:`octseg.tasks.preprocess`, :mod:`octseg.tasks.tracking`,
:mod:`octseg.tasks.segmentation.qc`, :mod:`octseg.tasks.runtime`, :mod:`octseg.unet`, Prefect; MLflow and
torch inside functions.
"""
