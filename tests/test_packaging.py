"""An install from a wheel works as well as an editable one: catalogue, coefficients and schema ship inside."""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """The project built as a wheel (from a copy of the tree) and installed alone into a fresh venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "reports"))
    dist = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)]
    try:
        import setuptools  # noqa: F401  (present: build offline with it; absent: pip fetches it)
        cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    wheel = next(dist.glob("vramcal-*.whl"))
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    return env_dir, wheel


def run_installed(env_dir: Path, *args, cwd: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMCAL_") and k != "PYTHONPATH"}
    return subprocess.run([str(env_dir / "bin" / "vramcal"), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def test_the_wheel_carries_the_data(wheel_venv):
    import zipfile

    _, wheel = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    assert "vramcal/configs/models/llama-3.1-8b.json" in names
    assert "vramcal/coefficients/transformers-h100.json" in names
    assert "vramcal/schema/record-1.json" in names
    assert "estimator/data/gpus.json" in names


def test_an_installed_wheel_estimates_from_another_directory(wheel_venv, tmp_path):
    env_dir, _ = wheel_venv
    r = run_installed(env_dir, "models", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == len(list((ROOT / "configs" / "models").glob("*.json")))
    r = run_installed(env_dir, "estimate", "llama-3.1-8b", "--context", "8192", "--batch", "4", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["weights_bytes"] == 16_060_522_496
    assert out["coefficients"]["calibrated"] is True  # the shipped H100 coefficients, not the defaults
    editable = subprocess.run([sys.executable, "-m", "vramcal", "estimate", "llama-3.1-8b", "--context", "8192",
                               "--batch", "4", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert json.loads(editable.stdout)["total_bytes"] == out["total_bytes"]


def test_an_installed_wheel_finds_the_record_schema(wheel_venv, tmp_path):
    env_dir, _ = wheel_venv
    code = "from estimator.records import SCHEMA_PATH; import json; print(json.load(open(SCHEMA_PATH))['$id'] if '$id' in json.load(open(SCHEMA_PATH)) else 'ok')"
    r = subprocess.run([str(env_dir / "bin" / "python"), "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
