"""The hostile-input probe (:mod:`tests.tasks.readers.probe`), bounded for ``make test``: for each format a
seeded set of mutated files, each refused with one line naming the file or read whole, equal to what the
format's own library reads; none stored in part, none crashing or hanging the reader. The README's
counts come from ``python -m tests.tasks.readers.probe 1000``."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.tasks.readers.probe import formats, probe, quiet

PER_FORMAT = 120  # mutations per format here: a few seconds each on two busy cores


@pytest.mark.parametrize("fmt", formats(), ids=lambda f: f.name)
def test_mutated_files_are_refused_in_one_line_or_read_whole(fmt, tmp_path: Path) -> None:
    with quiet():
        counts, bad = probe(fmt, PER_FORMAT, tmp_path, seed=17)
    assert not bad, f"{fmt.name}: {counts}\n" + "\n".join(bad[:10])
    assert counts["stored in part"] == counts["crashed"] == 0
    assert counts["tried"] >= PER_FORMAT * 0.8 and counts["refused"] > 0
    assert counts["tried"] == counts["refused"] + counts["ingested whole"]
