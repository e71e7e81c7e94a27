"""One volume's catalogue entry, read from the volume's own records, and what the catalogue remembers of a
source file: the rows of :mod:`octseg.tasks.archive.catalogue`, without SQLite.

A row's fields (:data:`VOLUME_COLUMNS`, in that order), the stamps that tie it to the files it was read from
(:func:`file_stamp`: inode, size, mtime in ns, taken on the descriptor read) and the digests that show a row
edited or damaged (:func:`row_digest`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from octseg.tasks.readers.registry import reader_named

try:  # several times faster than json's on the catalogue's provenance rows (a plan decodes 100,000 of them)
    from orjson import JSONDecodeError as _OrjsonError
    from orjson import loads as _orjson_loads
except ImportError:  # pragma: no cover - orjson comes with Prefect
    _orjson_loads = None

__all__ = ["DETAIL_COLUMNS", "SOURCE_COLUMNS", "VOLUME_COLUMNS", "SourceIndex", "SourceRecord", "VolumeEntry",
           "canonical", "loads",
           "file_stamp", "image_fingerprint_of", "reading_settings", "n_bscans_fallback", "octseg_attrs", "read_entry", "read_json", "row_digest", "stamp_at"]

VOLUME_COLUMNS = ("volume_id", "status", "v_stamp", "source", "source_sha256", "source_size", "source_mtime_ns",
                   "source_ino", "reader", "n_bscans", "labels_sha256", "image_fp", "manual", "annotated", "p_stamp",
                   "model_name", "model_version", "p_image_fp", "p_complete", "derived", "settings", "labels_digest")
DETAIL_COLUMNS = ("meta", "prediction")  # JSON, loaded only where needed; their own digest
SOURCE_COLUMNS = ("key", "stamp", "parts", "sha256", "volume_id", "bad", "bad_settings")


def loads(text: str) -> Any:
    """``json.loads``, through orjson where it is installed (and json where orjson refuses: NaN, Infinity)."""
    if _orjson_loads is not None:
        try:
            return _orjson_loads(text)
        except _OrjsonError:
            pass
    return json.loads(text)


def file_stamp(st: os.stat_result) -> str:
    """What identifies one version of a file: inode, size and modification time (ns)."""
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def stamp_at(path: str) -> str | None:
    try:
        return file_stamp(os.stat(path))
    except OSError:
        return None


def row_digest(values: Iterable[Any]) -> str:
    # a list, not a generator: str.join makes one from its argument anyway (a third faster per row)
    return hashlib.blake2b("\x1f".join(["\x00" if v is None else str(v) for v in values]).encode(),
                           digest_size=8).hexdigest()


def image_fingerprint_of(meta: Mapping[str, Any]) -> str:
    """Identifies a volume's image from its provenance: its source's sha256, when it was ingested, the reader
    (:meth:`octseg.tasks.archive.store.Archive.image_fingerprint`)."""
    key = json.dumps([meta.get("source_sha256"), meta.get("ingested_at"), meta.get("reader")])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def reading_settings(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a volume was read with that change what ingest writes, from its provenance: the options its
    reader takes that it records (e.g. Duke's ``grader``), whether identifiers were found and kept, and the versions
    of the reading rules it was read under (``reading``, ``mask_reading``). Ingest's no-op plan compares these
    (:func:`octseg.tasks.ingest.rules.unchanged`) without loading the provenance."""
    found = reader_named(meta.get("reader")) if isinstance(meta.get("reader"), str) else None
    options = found.option_defaults if found is not None else {}
    return {**{key: meta[key] for key in options if key in meta},
            "has_identifiers": meta.get("has_identifiers"), "identifiers_kept": meta.get("identifiers_kept"),
            "reading": meta.get("reading"), "mask_reading": meta.get("mask_reading")}


def canonical(value: Any) -> str:
    """One JSON text per value (sorted keys, tuples as lists): how fingerprints are compared."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# ---- one volume, read from its own records ---------------------------------------------------------------

def read_json(path: str) -> tuple[str | None, Any]:
    """(stamp, parsed content) of a JSON file, both from one descriptor; (None, None) when it does not exist.
    ValueError when it is not JSON."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    try:
        st = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, max(st.st_size, 4096) + 1):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return file_stamp(st), json.loads(b"".join(chunks))


def octseg_attrs(doc: Any) -> dict[str, Any]:
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
    found = attrs.get("octseg", {}) if isinstance(attrs, dict) else {}
    return dict(found) if isinstance(found, dict) else {}


@dataclass
class VolumeEntry:
    """A volume as its catalogue row (or its own records) summarise it. ``derived`` maps each derived array
    to ``[stamp, complete, canonical fingerprint]``; ``meta`` and ``prediction`` are the octseg attributes of
    the volume (without identifiers) and of its prediction, loaded only where asked for."""

    volume_id: str
    status: str = "ingested"
    v_stamp: str | None = None
    source: str | None = None
    source_sha256: str | None = None
    source_size: int | None = None
    source_mtime_ns: int | None = None
    source_ino: int | None = None
    reader: str | None = None
    n_bscans: int = 0
    labels_sha256: str | None = None
    image_fp: str | None = None
    manual: bool = False  # listed manual labels
    annotated: int = 0  # annotated B-scans of the manual labels
    p_stamp: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    p_image_fp: str | None = None
    p_complete: bool = False  # a complete prediction, listed in the labels group
    derived_json: str = "{}"  # {name: [stamp, complete, canonical fingerprint]}; parsed by :attr:`derived`
    settings: str | None = None  # canonical JSON of :func:`reading_settings`: what ingest compares besides bytes
    labels_digest: str | None = None  # of the manual labels as written (``layout.labels_digest``); None: not recorded
    meta: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    _derived: dict[str, list[Any]] | None = field(default=None, repr=False, compare=False)

    @property
    def derived(self) -> dict[str, list[Any]]:
        """Each derived array: ``[stamp, complete, canonical fingerprint]``."""
        if self._derived is None:
            self._derived = loads(self.derived_json or "{}")
        return self._derived

    def set_derived(self, derived: dict[str, list[Any]]) -> None:
        self._derived, self.derived_json = derived, canonical(derived)

    def row(self) -> tuple[Any, ...]:
        return (self.volume_id, self.status, self.v_stamp, self.source, self.source_sha256, self.source_size,
                self.source_mtime_ns, self.source_ino, self.reader, self.n_bscans, self.labels_sha256, self.image_fp,
                int(self.manual), self.annotated, self.p_stamp, self.model_name, self.model_version, self.p_image_fp,
                int(self.p_complete), self.derived_json, self.settings, self.labels_digest)

    @classmethod
    def from_row(cls, values: Sequence[Any]) -> VolumeEntry:
        (vid, status, v_stamp, source, sha, size, mtime, ino, reader, n, labels_sha, image_fp, manual, annotated,
         p_stamp, model_name, model_version, p_image_fp, p_complete, derived, settings, labels_digest) = values
        return cls(vid, status, v_stamp, source, sha, size, mtime, ino, reader, int(n or 0), labels_sha, image_fp,
                   bool(manual), int(annotated or 0), p_stamp, model_name, model_version, p_image_fp, bool(p_complete),
                   derived or "{}", settings, labels_digest)

    def segmented_by(self, model_name: str, model_version: str | int) -> bool:
        """The rule of :func:`octseg.tasks.archive.store.already_segmented`: a complete prediction by this model
        name and version, made from the volume's current image."""
        return (self.p_complete and (self.model_name, str(self.model_version)) == (model_name, str(model_version))
                and self.p_image_fp == self.image_fp)

    def derived_current(self, name: str, fingerprint: Mapping[str, Any]) -> bool:
        """The rule of :meth:`DerivedArrays.derived_is_current`: complete, with this fingerprint."""
        found = self.derived.get(name)
        return bool(found) and found[1] is True and found[2] == canonical(json.loads(canonical(fingerprint)))


def read_entry(root: Path, volume_id: str) -> VolumeEntry | None:
    """The entry of ``volume_id`` read from the volume's own ``zarr.json`` files; None when no volume of that id
    exists. A volume whose records cannot be parsed gets status ``unreadable`` (every plan gives it work)."""
    base = os.path.join(root, volume_id)
    try:
        v_stamp, doc = read_json(os.path.join(base, "zarr.json"))
    except (OSError, ValueError):
        return VolumeEntry(volume_id, status="unreadable")
    if v_stamp is None:
        return None
    meta = octseg_attrs(doc)
    meta.pop("identifiers", None)  # the catalogue is kept as clean as the archive's defaults
    entry = VolumeEntry(volume_id, v_stamp=v_stamp, meta=meta)
    stat = meta.get("source_stat") if isinstance(meta.get("source_stat"), dict) else {}
    entry.source, entry.source_sha256, entry.reader = meta.get("source"), meta.get("source_sha256"), meta.get("reader")
    entry.source_size, entry.source_mtime_ns, entry.source_ino = stat.get("size"), stat.get("mtime_ns"), stat.get("ino")
    entry.labels_sha256, entry.image_fp = meta.get("labels_sha256"), image_fingerprint_of(meta)
    entry.settings = canonical(reading_settings(meta))
    try:
        entry.n_bscans = int(meta.get("n_bscans") or 0)
        _, labels_doc = read_json(os.path.join(base, "labels", "zarr.json"))
        listed = labels_doc.get("attributes", {}).get("ome", {}).get("labels", []) if labels_doc else []
        if "manual" in listed:
            _, manual = read_json(os.path.join(base, "labels", "manual", "zarr.json"))
            if manual is not None:
                attrs = octseg_attrs(manual)
                entry.manual, entry.annotated = True, len(attrs.get("annotated_bscans", []))
                entry.labels_digest = attrs.get("labels_digest")
        p_stamp, prediction = read_json(os.path.join(base, "labels", "prediction", "zarr.json"))
        entry.p_stamp = p_stamp
        info = octseg_attrs(prediction) if prediction is not None else {}
        if info:
            entry.prediction = info
            entry.model_name, entry.p_image_fp = info.get("model_name"), info.get("image_fingerprint")
            entry.model_version = None if info.get("model_version") is None else str(info.get("model_version"))
            entry.p_complete = info.get("complete") is True and "prediction" in listed
        derived: dict[str, list[Any]] = {}
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for e in sorted(os.scandir(os.path.join(base, "derived")), key=lambda e: e.name):
                d_stamp, d_doc = read_json(os.path.join(e.path, "zarr.json"))
                if d_stamp is not None:
                    attrs = octseg_attrs(d_doc)
                    derived[e.name] = [d_stamp, attrs.get("complete") is True, canonical(attrs.get("fingerprint"))]
        entry.set_derived(derived)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return VolumeEntry(volume_id, status="unreadable", v_stamp=v_stamp)
    entry.status = ("segmented" if entry.p_complete else
                    "preprocessed" if (entry.derived.get("normalized") or [None, False])[1] else "ingested")
    return entry


def n_bscans_fallback(root: Path, volume_id: str) -> int | None:
    """B-scans of a volume whose provenance does not record them: the image array's shape."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, IndexError):
        _, doc = read_json(os.path.join(root, volume_id, "s0", "zarr.json"))
        return int(doc["shape"][0])
    return None


# ---- sources: files octseg has read ----------------------------------------------------------------------

@dataclass(frozen=True)
class SourceRecord:
    """What octseg knows of a file at one path: its stamp when it was read (``parts``: the other files that make
    up the source, relative to its folder, for exports and folders), its SHA-256, the volume that holds that
    content, or why it was refused (``bad``) under which reading settings (``bad_settings``)."""

    key: str
    stamp: str
    parts: tuple[str, ...] | None
    sha256: str | None
    volume_id: str | None = None
    bad: str | None = None
    bad_settings: str | None = None

    def row(self) -> tuple[Any, ...]:
        return (self.key, self.stamp, None if self.parts is None else json.dumps(list(self.parts)), self.sha256,
                self.volume_id, self.bad, self.bad_settings)


class SourceIndex(Mapping[str, SourceRecord]):
    """Every file octseg remembers, by key, read in one query; each row is checked against its digest (and
    made a :class:`SourceRecord`) only when looked up. A row failing its digest is not there (the file is
    read again)."""

    def __init__(self, rows: Iterable[Sequence[Any]]) -> None:
        self._rows = {row[0]: row for row in rows}  # SOURCE_COLUMNS..., digest

    def __getitem__(self, key: str) -> SourceRecord:
        *values, digest = self._rows[key]
        if digest != row_digest(values):
            raise KeyError(key)
        key, stamp, parts, sha, vid, bad, settings = values
        return SourceRecord(key, stamp, None if parts is None else tuple(loads(parts)), sha, vid, bad, settings)

    def __iter__(self) -> Iterator[str]:
        return (key for key in self._rows if key in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __bool__(self) -> bool:
        return bool(self._rows)
