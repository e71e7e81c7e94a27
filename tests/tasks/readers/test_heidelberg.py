"""Heidelberg .vol (real exports when ../shared/data is present) and .e2e (synthetic files)."""
from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import read_volume
from tests.tasks.readers import vendor_files as vf
from tests.tasks.readers.checks import RNG, WILLIS, assert_common, half, shared


def test_vol_line_scan_equals_eyepy() -> None:
    import eyepy
    from eyepy.io import HeVolReader

    p = shared(WILLIS[0], WILLIS[1].format(0))
    vol = read_volume(p)
    assert_common(vol, p, "heyex-vol")
    np.testing.assert_array_equal(vol.image, eyepy.import_heyex_vol(p).data)
    assert vol.image.shape == (1, 496, 768) and vol.image.dtype == np.uint8
    assert vol.scale_um == pytest.approx((11.8206, 3.8717, 11.8206), abs=1e-4)
    assert vol.meta["z_spacing"] == "none (single B-scan)" and "eyepy" in vol.meta["intensity"]
    assert vol.meta.items() >= {"laterality": "OD", "scan_pattern": "line", "acquired": "2017-01-11"}.items()
    assert vol.fundus.shape == (768, 768) and vol.fundus.dtype == np.uint8
    assert vol.fundus_scale_um == pytest.approx((11.8206, 11.8206), abs=1e-4)
    raw = HeVolReader(p).layers  # (n_layers, Z, X), >= 3e38 already NaN; RNFL is all NaN here
    assert set(vol.layers) == {"ILM", "BM"} and vol.layers_source == "device"
    np.testing.assert_array_equal(vol.layers["ILM"], raw[0])
    np.testing.assert_array_equal(vol.layers["BM"], raw[1])
    assert np.isnan(vol.layers["BM"]).sum() == 135 and np.nanmax(vol.layers["BM"]) < 496
    assert vol.identifiers == {"patient_id": "01234", "pid": "86", "birth_date": "1951-10-03", "vid": "145"}


@pytest.mark.parametrize("n", [2, 4])
def test_vol_circle_scans(n: int) -> None:
    import eyepy
    from eyepy.core.utils import vol_intensity_transform
    from eyepy.io import HeVolReader

    p = shared(WILLIS[0], WILLIS[1].format(n))
    with pytest.raises(ValueError, match="scan pattern 2"):
        eyepy.import_heyex_vol(p)  # what this reader works around
    vol = read_volume(p)
    assert_common(vol, p, "heyex-vol")
    assert vol.image.shape == (1, 496, 768) and vol.meta["scan_pattern"] == "circle"
    expected = vol_intensity_transform(HeVolReader(p).parsed_file.bscans[0].data.astype(np.float32))
    np.testing.assert_array_equal(vol.image[0], expected)
    assert vol.scale_um == pytest.approx((14.722, 3.8717, 14.722), abs=1e-3)
    assert set(vol.layers) == {"ILM", "BM", "RNFL"} and vol.fundus.shape == (768, 768)


def test_vol_volume_equals_eyepy() -> None:
    import eyepy

    p = shared("heyex_eyepy_tests", "test_volume.vol")
    vol = read_volume(p)
    assert_common(vol, p, "heyex-vol")
    np.testing.assert_array_equal(vol.image, eyepy.import_heyex_vol(p).data)
    assert vol.image.shape == (10, 40, 50) and vol.fundus.shape == (50, 50)
    assert vol.scale_um == pytest.approx((31.444, 3.872, 11.819), abs=1e-3)
    assert vol.layers == {} and vol.layers_source is None  # no layers stored
    assert vol.identifiers["patient_id"] == "Study-01" and "visit_id" not in vol.identifiers  # 'unknown' dropped


def test_vol_limit_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from eyepy.io.he import vol_reader

    p = shared(WILLIS[0], WILLIS[1].format(0))
    monkeypatch.setattr(vol_reader.HeVolReader, "__init__", lambda *a: pytest.fail("decoded before the check"))
    with pytest.raises(ReadError, match=r"1 x 496 x 768 = 380,928 voxels exceeds the limit of 1,000"):
        read_volume(p, max_voxels=1000)


def test_forged_vol_headers_refused_quickly(tmp_path: Path) -> None:
    huge = vf.write_vol_header(tmp_path / "huge.vol", 100_000, 100_000, 100_000, extra=2048)
    slo = vf.write_vol_header(tmp_path / "slo.vol", 4, 1, 4, slo=100_000, extra=2048)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ReadError, match="exceeds the limit"):
        read_volume(huge)
    with pytest.raises(ReadError, match=r"truncated: the header promises 100000 B-scans"):
        read_volume(huge, max_voxels=None)
    with pytest.raises(ReadError, match="SLO image of 100000 x 100000"):
        read_volume(slo)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - start < 2 and peak < 20e6


@pytest.mark.parametrize("parts", [(WILLIS[0], WILLIS[1].format(0)), (WILLIS[0], WILLIS[1].format(2)),
                                   ("heyex_eyepy_tests", "test_volume.vol")])
def test_truncated_vol(tmp_path: Path, parts: tuple[str, str]) -> None:
    cut = half(shared(*parts), tmp_path / "cut.vol")
    with pytest.raises(ReadError, match="truncated"):
        read_volume(cut)


def test_e2e_synthetic_equals_eyepy(tmp_path: Path) -> None:
    import eyepy

    codes = RNG.integers(0, 60000, (3, 10, 12)).astype(np.uint16)  # E2E's 16-bit float codes
    rows = {0: RNG.uniform(1, 4, (3, 12)), 1: RNG.uniform(6, 9, (3, 12)), 2: np.full((3, 12), 3.0e38)}
    p = vf.write_e2e(tmp_path / "exam.e2e", codes, rows)
    vol = read_volume(p)
    assert_common(vol, p, "heyex-e2e")
    np.testing.assert_array_equal(vol.image, eyepy.import_heyex_e2e(p).data)
    assert vol.image.shape == (3, 10, 12) and vol.image.dtype == np.uint8
    assert set(vol.layers) == {"ILM", "BM"}  # RNFL (id 2) is all 3e38: absent
    np.testing.assert_array_equal(vol.layers["ILM"], rows[0].astype(np.float32))
    assert vol.meta.items() >= {"laterality": "OS", "scan_pattern": "volume", "acquired": "2019-04-17",
                                "device": "Heidelberg Retina Angiograph"}.items()
    assert vol.scale_um == pytest.approx((289.6, 3.9, 20 / 12 * 289.6))  # eyepy's degrees x 289.6 µm
    assert vol.fundus.shape == (8, 8)
    assert vol.identifiers.items() >= {"first_name": "Erika", "surname": "Mustermann", "patient_id": "E2E-777",
                                       "study_name": "Glaucoma study"}.items()
    with pytest.raises(ReadError, match="3 x 10 x 12 = 360 voxels exceeds the limit of 100"):
        read_volume(p, max_voxels=100)
    with pytest.raises(ReadError, match="truncated"):
        read_volume(half(p, tmp_path / "cut.e2e"))


def test_e2e_errors(tmp_path: Path) -> None:
    head = tmp_path / "head.e2e"  # the magic of an E2E file, then nothing
    head.write_bytes(b"CMDb" + bytes(0x20) + b"MDbMDir" + bytes(100))
    with pytest.raises(ReadError):
        read_volume(head)
    wrong = tmp_path / "wrong.e2e"
    wrong.write_bytes(b"NOPE" + bytes(500))
    with pytest.raises(ReadError, match="not a Heidelberg .e2e file"):
        read_volume(wrong)


def test_e2e_without_layer_annotations_is_read(tmp_path: Path) -> None:
    vol = read_volume(vf.write_e2e(tmp_path / "x.e2e", np.full((2, 16, 24), 30000, np.uint16), {}))
    assert vol.image.shape[0] == 2 and vol.layers == {} and any("no layer" in w for w in vol.warnings)


# ---- only OCT B-scans: what the file says it is (issue 17, item 2) --------------------------------------------

def test_synthetic_vol_equals_eyepy(tmp_path: Path) -> None:
    from eyepy.core.utils import vol_intensity_transform
    from eyepy.io import HeVolReader

    raw = RNG.random((3, 10, 12)).astype(np.float32)
    p = vf.write_vol(tmp_path / "s.vol", raw)
    vol = read_volume(p)
    assert_common(vol, p, "heyex-vol")
    expected = vol_intensity_transform(np.stack([b.data for b in HeVolReader(p).parsed_file.bscans]))
    np.testing.assert_array_equal(vol.image, expected)
    assert set(vol.layers) == {"ILM", "BM"} and vol.fundus.shape == (8, 8)


def test_slo_only_vol_is_refused_with_the_reason(tmp_path: Path) -> None:
    p = vf.write_vol_header(tmp_path / "slo_only.vol", 12, 0, 10, slo=8, extra=64)
    with pytest.raises(ReadError, match=r"an SLO-only export: a 8 x 8 fundus image and no OCT B-scans"):
        read_volume(p)


@pytest.mark.parametrize(("series", "phrase"), [
    ({"oct_modality": ("OCT-A", "OCTA")}, r"only OCT angiography series \(.*'OCTA'.*\): flow data"),
    ({"scan_pattern": "OCT Angiography Volume"}, r"only OCT angiography series"),
    ({"bscans": False}, r"no OCT B-scans in the \.e2e file: its series hold only fundus/SLO images \('IR', 'Infra-Red'\)"),
])
def test_e2e_angiography_or_fundus_only_is_refused(tmp_path: Path, series: dict, phrase: str) -> None:
    p = vf.write_e2e(tmp_path / "x.e2e", np.full((2, 16, 24), 30000, np.uint16), {}, **series)
    with pytest.raises(ReadError, match=phrase) as err:
        read_volume(p)
    assert "x.e2e" in str(err.value)
