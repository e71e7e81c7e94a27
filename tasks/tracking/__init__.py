"""MLflow at the edge: where tracking goes, the registered U-Nets, and which version is the champion.

Owns: the tracking URI, experiments and clients (:mod:`.uri`), logging, resolving and loading a
registered U-Net (:mod:`.models`), and the scores and aliases that make a champion (:mod:`.champion`).

May import: :mod:`octseg.unet` (its configs); ``mlflow`` and ``torch`` only inside functions, so that
``octseg --help`` stays fast. No archive, no Prefect.
"""
