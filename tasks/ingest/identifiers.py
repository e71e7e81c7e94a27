"""Patient identifiers kept out of the archive: which text carries them, and how it is redacted.

Vendor readers (:mod:`octseg.tasks.readers`) return the identifying header fields of a file (names,
patient ids, birth dates, free text) in ``ScanVolume.identifiers``. Unless the user opts in with
``--keep-identifiers``, ingest writes none of them: not in the metadata, not in the volume id (a file
named after the patient gets an id from its content) and not in the stored source path (the
identifying parts are replaced by ``[redacted]``).

Matching is deliberately generous for the patient's own identifiers (not the site's or staff's): each value is split into its parts (``Doe^John`` -> ``Doe``,
``John``), dates are also looked for as ``YYYYMMDD``, ``DD.MM.YYYY`` and ``MM/DD/YYYY``, and a part
matches case-insensitively anywhere in the text (parts of 4 or more characters) or as a whole word
(parts of 2-3 characters, so a surname ``Li`` does not redact every ``link``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["REDACTED", "content_volume_id", "has_identifier", "identifier_parts", "redact"]

REDACTED = "[redacted]"
_SPLIT = re.compile(r"[\s^,;/\\|]+")
_DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")


def _date_forms(value: str) -> list[str]:
    m = _DATE.fullmatch(value.strip()[:10]) or _DATE.fullmatch(value.strip())
    if not m:
        return []
    y, mo, d = m.groups()
    forms = [f"{y}{sep}{mo}{sep}{d}" for sep in ("-", "", "_", ".", "/", " ")]
    forms += [f"{d}{sep}{mo}{sep}{y}" for sep in (".", "", "_", "-", "/")] + [f"{mo}/{d}/{y}", f"{mo}-{d}-{y}"]
    return forms


_PATIENT_KEY = re.compile(r"patient|birth|dob|surname|first|last|middle|mid_?name|^(p|v)?id$|visit|accession"
                          r"|session|progression|medical|admission|record|mrn|addr|phone|zip", re.IGNORECASE)
_STAFF_KEY = re.compile(r"institution|physician|operator|station|department|description|comment|serial|device"
                        r"|study|series|procedure|sop|frame|media", re.IGNORECASE)


def _about_the_patient(key: str) -> bool:
    """Keys of the patient's own identifiers (names, ids, birth date, visit), not the site's or staff's
    (institution, operator, descriptions): only these are looked for in file names and paths, where an
    operator called "main" would otherwise redact every ``/main/`` folder. None of them is written either way."""
    return key.lower().startswith("patient") or (bool(_PATIENT_KEY.search(key)) and not _STAFF_KEY.search(key))


def identifier_parts(identifiers: Mapping[str, str]) -> list[str]:
    """Every string to look for: whole values of the patient's identifiers, their name parts and date
    spellings; longest first."""
    parts: set[str] = set()
    for key, value in identifiers.items():
        if not _about_the_patient(key):
            continue
        text = str(value).strip()
        if len(text) < 2:
            continue
        parts.add(text)
        words = [p for p in _SPLIT.split(text) if p]
        parts.update(p for p in words if len(p) >= 2)
        if len(words) > 1:  # written together in a file name: "LiWu", "WuLi"
            parts.update({"".join(words), "".join(reversed(words))})
        parts.update(_date_forms(text))
    return sorted(parts, key=lambda p: (-len(p), p))


def _pattern(parts: list[str]) -> re.Pattern[str] | None:
    alternatives = []
    for p in parts:
        escaped = re.escape(p)
        alternatives.append(escaped if len(p) >= 4 else rf"(?<![A-Za-z0-9]){escaped}(?![A-Za-z0-9])")
    return re.compile("|".join(alternatives), re.IGNORECASE) if alternatives else None


def has_identifier(text: str, identifiers: Mapping[str, str]) -> bool:
    """True when ``text`` (a file name, a path) contains any part of ``identifiers``."""
    pattern = _pattern(identifier_parts(identifiers))
    return bool(pattern and pattern.search(text))


def redact(text: str, identifiers: Mapping[str, str]) -> str:
    """``text`` with every part of ``identifiers`` replaced by ``[redacted]``."""
    pattern = _pattern(identifier_parts(identifiers))
    return pattern.sub(REDACTED, text) if pattern else text


def content_volume_id(reader: str, sha256: str) -> str:
    """The volume id of a file whose name identifies the patient: its format and content hash."""
    return f"{reader}-{sha256[:12]}"
