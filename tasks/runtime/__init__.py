"""How work runs: Dask clusters and clients, retries of flaky I/O, progress bars, process liveness.

Owns: :mod:`.cluster` (a LocalCluster or a scheduler by address, one client per process), :mod:`.retry`
(which failures Prefect retries), :mod:`.progress` (terminal progress bars), :mod:`.processes`
(whether the holder of a claim, staging folder or training run is alive; heartbeats), :mod:`.tether`
(child processes, Prefect's ephemeral server above all, that die with their parent) and :mod:`.memory`
(the cycle collector paused while a plan reads a large catalogue).

May import: the standard library; ``distributed``, ``rich`` and ``prefect`` inside functions. No other octseg
package.
"""
