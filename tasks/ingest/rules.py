"""Ingest's rules for a source whose volume id the archive already holds: keep it, write it again, or refuse.

A stored volume records what it was made from: the source's SHA-256 and a salted digest of its path,
the fingerprint of its masks, and the settings that change what is written (the reader options its
reader takes, such as Duke's ``grader``, and whether identifiers were kept). :func:`existing_volume`
compares those with the source at hand; :func:`octseg.tasks.ingest.source.ingest_source` states the rule.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from octseg.tasks.readers.registry import reader_named
from octseg.tasks.readers.sources import shown

__all__ = ["existing_volume", "labels_sha256", "path_digest", "reader_settings", "same_content", "settings_match",
           "unchanged"]


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


def reader_settings(reader: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options reader ``reader`` takes, as ``options`` set them (else their defaults): what a volume records."""
    found = reader_named(reader)
    defaults = found.option_defaults if found is not None else {}
    return {key: options.get(key, default) for key, default in defaults.items()}


def _same_path(meta: Mapping[str, Any], src: Path) -> bool:
    """Whether the stored volume came from the file at ``src`` (its path digest; the stored path before)."""
    stored = meta.get("source_path_digest")
    if isinstance(stored, str) and ":" in stored:
        return path_digest(src, stored.split(":", 1)[0]) == stored
    return meta.get("source") == str(src.resolve())


def settings_match(meta: Mapping[str, Any], options: Mapping[str, Any]) -> bool:
    """The stored volume was read with the settings that change what is written: the options its reader
    takes (a volume stored before one was recorded has its default), and whether the identifiers of a
    file that has them were kept."""
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
    """Same bytes, no new masks, same settings: ingest keeps the stored volume as it is."""
    return (same_content(meta.get("source_sha256"), meta.get("labels_sha256"), sha, labels_fp)
            and settings_match(meta, options))


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
    return "write", None  # new or changed masks, or another grader / identifier setting
