"""Topcon .fds/.fda, Zeiss .img and Bioptigen .oct (synthetic), cross-checked with oct-converter's own classes."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import read_volume
from tests.tasks.readers import vendor_files as vf
from tests.tasks.readers.checks import RNG, VOL16, assert_common, half


@pytest.fixture
def fromstring(monkeypatch: pytest.MonkeyPatch):
    """np.fromstring for binary data, which oct-converter 0.7.0's FDS/FDA classes still call."""
    pytest.importorskip("oct_converter")
    monkeypatch.setattr(np, "fromstring", lambda s, dtype=float: np.frombuffer(s, dtype=dtype).copy())


def test_topcon_fds(tmp_path: Path, fromstring) -> None:
    from oct_converter.readers import FDS

    p = vf.write_fds(tmp_path / "scan.fds", VOL16)
    vol = read_volume(p)
    assert_common(vol, p, "topcon-fds")
    ref = FDS(p).read_oct_volume()
    np.testing.assert_array_equal(vol.image, np.stack(ref.volume))
    np.testing.assert_array_equal(vol.image, VOL16)
    x, z, y = ref.pixel_spacing  # mm, oct-converter's order
    assert vol.scale_um == pytest.approx((z * 1000, y * 1000, x * 1000)) == (2000, 2.6, 200)
    assert vol.meta.items() >= {"laterality": "OS", "acquired": "2021-06-15", "device": "Topcon 3D OCT-1"}.items()
    assert vol.fundus.shape == (6, 8) and vol.fundus[0, 0] == 22  # luminance of RGB (30, 20, 10)
    assert vol.identifiers.items() >= {"patient_id": "TP-0042", "first_name": "Hanako", "last_name": "Yamada",
                                    "birth_date": "1971-03-09", "capture_label": "Yamada follow-up",
                                    "device_serial_number": "SN77Q1"}.items()


@pytest.mark.parametrize("jpeg", [False, True], ids=["raw", "jpeg"])
def test_topcon_fda(tmp_path: Path, fromstring, jpeg: bool) -> None:
    from oct_converter.readers import FDA

    rows = {"MULTILAYERS_1": RNG.integers(2, 8, (3, 30)).astype(float),
            "MULTILAYERS_7": RNG.integers(12, 18, (3, 30)).astype(float)}
    volume = (VOL16 // 16).astype(np.uint8) if jpeg else VOL16
    p = vf.write_fda(tmp_path / "scan.fda", volume, rows, jpeg=jpeg)
    vol = read_volume(p)
    assert_common(vol, p, "topcon-fda")
    ref = FDA(p).read_oct_volume()
    np.testing.assert_array_equal(vol.image, np.stack(ref.volume))
    if jpeg:
        assert vol.image.dtype == np.uint8 and np.abs(vol.image.astype(int) - volume).max() < 16
    else:
        np.testing.assert_array_equal(vol.image, VOL16)
    assert set(vol.layers) == {"ILM", "BM"} and vol.layers_source == "device"
    for name, cid in (("ILM", "MULTILAYERS_1"), ("BM", "MULTILAYERS_7")):
        np.testing.assert_array_equal(vol.layers[name], ref.contours[name])
        np.testing.assert_array_equal(vol.layers[name], rows[cid])
    assert vol.meta["laterality"] == "OD" and vol.fundus.shape == (6, 8) and vol.fundus[0, 0] == 99


def test_topcon_truncated(tmp_path: Path) -> None:
    pytest.importorskip("oct_converter")
    p = vf.write_fds(tmp_path / "scan.fds", VOL16)
    with pytest.raises(ReadError, match="truncated"):
        read_volume(half(p, tmp_path / "cut.fds"))
    with pytest.raises(ReadError, match="exceeds the limit"):
        read_volume(p, max_voxels=100)


def test_zeiss_img(tmp_path: Path) -> None:
    pytest.importorskip("oct_converter")
    cube = RNG.integers(0, 256, (200, 1024, 200), dtype=np.uint8)
    name = "P1234567_Macular Cube 200x200_6-15-2021_9-30-0_OS_sn4242_cube_raw.img"
    p = vf.write_cirrus_img(tmp_path / name, cube)
    vol = read_volume(p)
    assert_common(vol, p, "zeiss-img")
    np.testing.assert_array_equal(vol.image, cube)
    assert vol.scale_um is None and vol.warnings
    assert vol.meta.items() >= {"laterality": "OS", "acquired": "2021-06-15", "device": "Zeiss Cirrus"}.items()
    assert vol.identifiers == {"patient_id": "P1234567", "device_serial_number": "sn4242"}
    with pytest.raises(ReadError, match="exceeds the limit"):
        read_volume(p, max_voxels=1000)
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    with pytest.raises(ReadError, match="matches no known Cirrus geometry"):
        read_volume(tmp_path / "odd.img")


def test_bioptigen_oct(tmp_path: Path) -> None:
    pytest.importorskip("oct_converter")
    p = vf.write_bioptigen(tmp_path / "eye_OD_01.OCT", VOL16)
    vol = read_volume(p)
    assert_common(vol, p, "bioptigen-oct")
    np.testing.assert_array_equal(vol.image, VOL16)
    assert vol.meta.items() >= {"laterality": "OD", "acquired": "2019-11-05", "scan_pattern": "volume"}.items()
    assert vol.identifiers == {"description": "Subject Miller, baseline"} and vol.scale_um is None
    with pytest.raises(ReadError, match="truncated"):
        read_volume(half(p, tmp_path / "cut.oct"))
    with pytest.raises(ReadError, match="exceeds the limit"):
        read_volume(p, max_voxels=100)


@pytest.mark.parametrize("suffix", [".fds", ".fda", ".img", ".oct"])
def test_missing_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    p = tmp_path / f"scan{suffix}"
    p.write_bytes(b"FOCT" + bytes(400))
    for name in ("oct_converter", "oct_converter.readers", "oct_converter.readers.binary_structs"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the optional extra were not installed
    expected = f"reading {suffix} files needs the optional reader oct-converter: pip install 'octseg[vendor]'"
    with pytest.raises(ReadError) as err:
        read_volume(p)
    assert err.value.reason == expected


def test_extra_installed_but_a_system_library_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """opencv without libGL (a bare container): the line says what is missing, not that the extra is."""
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name.startswith("oct_converter"):
            raise ImportError("libGL.so.1: cannot open shared object file: No such file or directory", name="cv2")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m.startswith("oct_converter")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    p = tmp_path / "scan.img"
    p.write_bytes(bytes(200 * 1024 * 200))
    with pytest.raises(ReadError, match=r"oct-converter is installed but cannot be imported \(libGL\.so\.1.*libgl1"):
        read_volume(p)


def test_bioptigen_with_doppler_frames_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("oct_converter")
    p = vf.write_bioptigen(tmp_path / "flow.oct", VOL16, doppler=1)
    with pytest.raises(ReadError, match=r"Doppler \(flow\) data \(DOPPLERFLAG 1\)"):
        read_volume(p)
