"""Records of a device_map case over several GPUs hold summed peaks: a one-GPU fit leaves them out."""

import pytest

pd = pytest.importorskip("pandas")

from calibration.data import usable  # noqa: E402


def test_device_map_records_are_left_out_of_a_fit():
    df = pd.DataFrame([
        {"status": "ok", "device": "cuda", "peak_nvml_bytes": 10, "device_map": None},
        {"status": "ok", "device": "cuda", "peak_nvml_bytes": 20, "device_map": "auto"},
    ])
    keep, left_out = usable(df)
    assert list(keep["peak_nvml_bytes"]) == [10]
    assert left_out == {"device_map (several GPUs)": 1}
