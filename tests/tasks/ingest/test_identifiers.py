"""Which text carries a patient's identifiers, and its redaction: pure functions."""
from __future__ import annotations

from octseg.tasks.ingest.identifiers import content_volume_id, has_identifier, identifier_parts, redact, REDACTED

IDS = {"PatientName": "Doe^Jane", "PatientID": "PAT-4711", "PatientBirthDate": "19620417",
       "OperatorsName": "main", "InstitutionName": "Northside Eye Hospital", "pid": "86"}


def test_parts_split_names_and_spell_dates_every_way() -> None:
    parts = identifier_parts(IDS)
    assert {"Doe^Jane", "Doe", "Jane", "PAT-4711", "19620417", "1962-04-17", "17.04.1962", "04/17/1962"} <= set(parts)
    assert "main" not in parts and "Hospital" not in parts  # staff and site: kept out, not hunted in paths
    assert parts == sorted(parts, key=lambda p: (-len(p), p))  # longest first: "Doe^Jane" before "Doe"


def test_names_and_paths_are_matched_generously_but_short_parts_as_words() -> None:
    assert has_identifier("DOE_JANE_OD.vol", IDS) and has_identifier("scan 1962-04-17.dcm", IDS)
    assert has_identifier("x/PAT-4711/y.vol", IDS) and has_identifier("86.vol", IDS)
    assert not has_identifier("/work/main/doer/1860.vol", IDS)  # "Doe" and "86" only as whole words
    assert not has_identifier("anything.vol", {})


def test_redact_replaces_every_occurrence() -> None:
    assert redact("/in/Doe_Jane_19620417/PAT-4711.dcm", IDS) == f"/in/{REDACTED}_{REDACTED}_{REDACTED}/{REDACTED}.dcm"
    assert redact("/work/main/scan.dcm", IDS) == "/work/main/scan.dcm"


def test_content_volume_id_is_a_valid_id_free_of_the_name() -> None:
    vid = content_volume_id("dicom", "ab" * 32)
    assert vid == "dicom-abababababab" and not has_identifier(vid, IDS)


def test_record_numbers_glued_names_and_other_date_separators_are_found() -> None:
    assert has_identifier("MRN12345.fds", {"record_id": "MRN12345"})
    assert has_identifier("LiWu_OD.dcm", {"PatientName": "Li^Wu"}) and has_identifier("wuli.vol", {"PatientName": "Li^Wu"})
    for name in ["scan_1962_04_17.vol", "1962.04.17.dcm", "17-04-1962.vol", "17041962.vol"]:
        assert has_identifier(name, {"PatientBirthDate": "19620417"}), name
