"""Synthetic OCT phantoms (:mod:`.phantom`) for the demo, the tests and the benchmarks: volumes with known labels.

May import: NumPy, SciPy, tifffile, Pillow. No other octseg package.
"""
