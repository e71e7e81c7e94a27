"""How work runs: Dask clusters and clients, retries of flaky I/O, progress bars, process liveness.

Owns: :mod:`.cluster` (a LocalCluster or a scheduler by address, one client per process), :mod:`.retry`
(which failures Prefect retries), :mod:`.progress` (terminal progress bars) and :mod:`.processes`
(whether the holder of a claim, staging folder or training run is alive; heartbeats).

May import: the standard library; ``distributed`` and ``rich`` inside functions. No other octseg package.
"""
