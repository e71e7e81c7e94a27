"""Ingest's rules for a source whose volume id the archive already holds: keep it, write it again, or refuse.

A stored volume records what it was made from: the source's SHA-256 and a salted digest of its path,
the fingerprint of its masks, and the settings that change what is written (the reader options its
reader takes, such as Duke's ``grader``, whether identifiers were kept, and the version of the reading
rules its reader and the mask rules had: ``reading`` and ``mask_reading``). A volume read under older
rules is read again; :func:`reread_only` tells when that is the only reason, so ingest can keep the volume
(and everything computed from it) when the new reading gives the same pixels and masks. :func:`existing_volume`
compares those with the source at hand; :func:`octseg.tasks.ingest.source.ingest_source` states the rule.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from octseg.tasks.readers.registry import reader_named
from octseg.tasks.readers.sources import shown

__all__ = ["MASK_READING", "existing_volume", "held_copy", "labels_sha256", "path_digest", "reader_settings", "reading_of",
           "reread_only", "same_content", "settings_match", "stale_reading", "unchanged"]

# The version of the mask rules (tasks/ingest/masks.py): raised when the same mask files read into other labels.
# 2: mask values decided per volume (class labels kept as they are, binary masks by one bright value, refusals).
MASK_READING = 2


def labels_sha256(labels_dir: str | Path | None, source: str | Path) -> str | None:
    """SHA-256 over the source's mask files (B-scan index, name and bytes); None without masks."""
    if labels_dir is None:
        return None
    from octseg.tasks.ingest.masks import mask_files  # the image readers: only where masks are given

    found = mask_files(labels_dir, source)
    if not found:
        return None
    digest = hashlib.sha256()
    for z, path in sorted(found.items()):
        digest.update(f"{z}:{path.name}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def path_digest(path: str | Path, salt: str) -> str:
    """``"<salt>:<sha256(salt + resolved path)>"``: recognises the same file path again without storing
    it (a redacted path cannot tell two patients' folders apart). Ingest salts with the start of the
    content's sha256: no table of hashed paths fits, and the same file gives the same archive."""
    return f"{salt}:{hashlib.sha256((salt + str(Path(path).resolve())).encode()).hexdigest()}"


def reading_of(reader: str | None) -> int:
    """The version of the reading rules of reader ``reader`` (its ``reading``; 1 for one that declares none)."""
    return int(getattr(reader_named(reader), "reading", 1))


def reader_settings(reader: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options reader ``reader`` takes, as ``options`` set them (else their defaults), and the version of
    its reading rules: what a volume records."""
    found = reader_named(reader)
    defaults = found.option_defaults if found is not None else {}
    return {**{key: options.get(key, default) for key, default in defaults.items()}, "reading": reading_of(reader)}


def stale_reading(meta: Mapping[str, Any], labels_fp: str | None) -> bool:
    """The stored volume was read under older rules than its reader's now (a volume that records none: 1), or,
    when masks are given (``labels_fp``), its masks under older mask rules."""
    if int(meta.get("reading") or 1) < reading_of(meta.get("reader")):
        return True  # (a newer octseg's reading is kept by an older one: never read back to older rules)
    return labels_fp is not None and int(meta.get("mask_reading") or 1) < MASK_READING


def _same_path(meta: Mapping[str, Any], src: Path) -> bool:
    """Whether the stored volume came from the file at ``src`` (its path digest; the stored path before)."""
    stored = meta.get("source_path_digest")
    if isinstance(stored, str) and ":" in stored:
        return path_digest(src, stored.split(":", 1)[0]) == stored
    return meta.get("source") == str(src.resolve())


def settings_match(meta: Mapping[str, Any], options: Mapping[str, Any]) -> bool:
    """The stored volume was read with the settings that change what is written: the options its reader
    takes (a volume stored before one was recorded has its default), and whether the identifiers of a
    file that has them were kept. The rules' versions are :func:`stale_reading`'s."""
    found = reader_named(meta.get("reader"))
    defaults = found.option_defaults if found is not None else {}
    if defaults and ({key: meta.get(key, default) for key, default in defaults.items()}
                     != {key: options.get(key, default) for key, default in defaults.items()}):
        return False
    keep = bool(options.get("keep_identifiers", False))
    return not meta.get("has_identifiers") or bool(meta.get("identifiers_kept")) == keep


def same_content(stored_sha: str | None, stored_labels: str | None, sha: str, labels_fp: str | None) -> bool:
    """The stored volume was made from these bytes, and no masks other than its own are given."""
    return stored_sha == sha and labels_fp in (None, stored_labels)


def unchanged(meta: Mapping[str, Any], sha: str, labels_fp: str | None, options: Mapping[str, Any]) -> bool:
    """Same bytes, no new masks, same settings, read under today's rules: ingest keeps the stored volume as it is."""
    return (same_content(meta.get("source_sha256"), meta.get("labels_sha256"), sha, labels_fp)
            and settings_match(meta, options) and not stale_reading(meta, labels_fp))


def reread_only(meta: Mapping[str, Any], sha: str, labels_fp: str | None, options: Mapping[str, Any]) -> bool:
    """Same bytes, masks and settings, but read under older rules: the one change is how octseg reads them."""
    return (same_content(meta.get("source_sha256"), meta.get("labels_sha256"), sha, labels_fp)
            and settings_match(meta, options) and stale_reading(meta, labels_fp))


def existing_volume(meta: Mapping[str, Any], volume_id: str, src: Path, sha: str, labels_fp: str | None,
                    options: Mapping[str, Any]) -> tuple[Literal["skip", "write", "fail"], str | None]:
    """What to do with a source whose volume id the archive already holds, and the error if "fail"."""
    if meta.get("source_sha256") != sha:
        if not _same_path(meta, src):
            return "fail", (f"{shown(src)}: volume id {volume_id!r} already holds {shown(meta.get('source'))} "
                            f"(different content); rename one of them or remove the volume")
        return "write", None  # the same file, updated in place
    if unchanged(meta, sha, labels_fp, options):
        return "skip", None  # same bytes (perhaps moved): keep the volume and its ground truth
    return "write", None  # new or changed masks, another grader / identifier setting, or newer reading rules


def held_copy(catalogue, volume_id: str, sha: str, labels_fp: str | None, options: Mapping[str, Any]) -> str | None:
    """The id of another volume made from these bytes, with the same masks (or none given now) and reading
    settings: the source is a copy of, or a link to, a file the archive holds under another name, and is not
    stored twice (two ids for one scan would let training validate, or cross-validation score, on a scan it
    trained on). Masks that differ (another grader) or other reader options make it a volume of its own; masks
    are compared by their fingerprint, which covers the mask files' names."""
    others = [v for v in catalogue.volumes_holding(sha) if v != volume_id]
    if not others:
        return None
    for vid, entry in catalogue.entries(others, details=True, missing_ok=True).items():
        meta = entry.meta or {}
        if same_content(meta.get("source_sha256"), meta.get("labels_sha256"), sha, labels_fp) and \
                settings_match(meta, options):
            return vid
    return None
