"""Bad input to `vramcal measure` and `vramcal sweep`: one line on stderr, exit status 2, checked before any
work, nothing written. And one rule for both: a case already in the output is skipped, a file of garbage
is refused.

Real runs through the command line with tiny models on the CPU, as in test_sweep_process.py. A missing
extra is simulated in the command's processes (the parent and its worker) with a `sitecustomize` on
PYTHONPATH that sets `sys.modules[name] = None`, which makes `import name` raise ModuleNotFoundError.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.errors import UserError
from estimator.paths import check_output_dir, check_output_file
from estimator.records import read_records

REPO = Path(__file__).resolve().parents[2]
QWEN_TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 4096, "max_window_layers": 2,
             "bos_token_id": 1, "eos_token_id": 2}
GPT2_TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 4096, "n_positions": 64, "n_ctx": 64}


def _config(tmp_path: Path, base: str, changes: dict, name: str) -> Path:
    config = json.loads((REPO / "configs" / "models" / f"{base}.json").read_text())
    config.update(changes)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A 2-layer qwen2 (rotary positions, 32,768 of them)."""
    return _config(tmp_path, "qwen2.5-0.5b", QWEN_TINY, "qwen-tiny")


@pytest.fixture
def gpt2_tiny(tmp_path) -> Path:
    """A 2-layer gpt2 with a learned table of 64 positions."""
    return _config(tmp_path, "gpt2", GPT2_TINY, "gpt2-tiny")


def vramcal(*args, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vramcal", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def one_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The single stderr line of a refused command, checked for exit 2, no traceback, and `fragments`."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def sweep_file(tmp_path: Path, models, contexts=(24,), extra: str = "") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
name = "tiny"
device = "cpu"
skip_over_estimate = 0
new_tokens = [4]
{extra}
[[matrix]]
models = {json.dumps([str(m) for m in models])}
contexts = {list(contexts)}
""")
    return path


def hide_modules(tmp_path: Path, *modules: str) -> dict:
    """Environment that makes `import <module>` fail in every Python process of the command."""
    site = tmp_path / "hide"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


# ---- output paths, before any work ----------------------------------------------------------------
def test_check_output_file_and_dir(tmp_path):
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    assert check_output_file(tmp_path / "new" / "deeper" / "r.jsonl") == tmp_path / "new" / "deeper" / "r.jsonl"
    assert not (tmp_path / "new").exists()  # the check creates nothing
    with pytest.raises(UserError, match=r"--out .* is a folder; give a file in it"):
        check_output_file(tmp_path)
    with pytest.raises(UserError, match=r"a.txt is a file, not a folder"):
        check_output_file(afile / "r.jsonl")
    with pytest.raises(UserError, match="needs a file name"):
        check_output_file("")
    assert check_output_dir(tmp_path / "report") == tmp_path / "report"
    with pytest.raises(UserError, match=r"--report .*a.txt is a file; give a folder"):
        check_output_dir(afile)
    with pytest.raises(UserError, match=r"a.txt is a file, not a folder"):
        check_output_dir(afile / "report")


def test_an_output_folder_that_cannot_be_created_is_refused(monkeypatch):
    """`--out /nonexistent/dir/x.jsonl` for a user who cannot write in / (root can: it is then created)."""
    import estimator.paths

    monkeypatch.setattr(estimator.paths.os, "access", lambda path, mode: str(path) != "/")
    with pytest.raises(UserError, match=r"^--out /nonexistent/dir/x.jsonl: cannot create /nonexistent/dir in / "
                                        r"\(permission denied\)$"):
        check_output_file("/nonexistent/dir/x.jsonl")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(UserError, match="permission denied"):
        check_output_file(locked / "sub" / "r.jsonl")


def test_measure_to_a_folder_or_below_a_file_is_refused_before_measuring(tmp_path, tiny):
    line = one_line(vramcal("measure", tiny, "--device", "cpu", "--context", "24", "--out", tmp_path),
                    "--out", "is a folder")
    assert str(tmp_path) in line
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line(vramcal("measure", tiny, "--device", "cpu", "--context", "24", "--out", blocker / "x.jsonl"),
             "is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "qwen-tiny.json"]


def test_sweep_to_a_folder_is_refused_before_measuring(tmp_path, tiny):
    path = sweep_file(tmp_path, [tiny])
    one_line(vramcal("sweep", path, "--out", tmp_path), "--out", "is a folder")
    # the sweep's own `out` setting is checked the same way
    (tmp_path / "outdir").mkdir()
    path = sweep_file(tmp_path, [tiny], extra=f'out = "{tmp_path / "outdir"}"')
    one_line(vramcal("sweep", path), "tiny.toml: out", "is a folder")
    assert list((tmp_path / "outdir").iterdir()) == []


# ---- records files: one rule for measure and sweep -----------------------------------------------
@pytest.mark.parametrize("command", ["measure", "sweep"])
def test_a_garbage_records_file_is_refused_and_left_alone(tmp_path, tiny, command):
    out = tmp_path / "notes.jsonl"
    out.write_text("my notes, not records\n")
    if command == "measure":
        result = vramcal("measure", tiny, "--device", "cpu", "--context", "24", "--out", out)
    else:
        result = vramcal("sweep", sweep_file(tmp_path, [tiny]), "--out", out)
    one_line(result, "notes.jsonl is not a records file", "notes.jsonl:1: not a JSON line")
    assert out.read_text() == "my notes, not records\n"


def test_an_incomplete_last_line_is_refused_before_measuring(tmp_path, tiny):
    """A whole record without its newline: appending after it would glue two records into one line. The
    refusal comes from the parent before a worker starts (with torch hidden, a worker would say so)."""
    from harness.sweep import existing_records

    record = read_records(REPO / "results" / "reference" / "h100-transformers-5.17.jsonl")[0]
    out = tmp_path / "cut.jsonl"
    out.write_text(json.dumps(record))
    with pytest.raises(UserError, match="ends with an incomplete line"):
        existing_records(out)
    result = vramcal("measure", tiny, "--device", "cpu", "--context", "24", "--out", out,
                     env=hide_modules(tmp_path, "torch"))
    one_line(result, "cut.jsonl ends with an incomplete line")
    assert out.read_text() == json.dumps(record)


def test_measure_skips_a_case_already_measured_unless_repeat(tmp_path, tiny):
    out = tmp_path / "m.jsonl"
    args = ("measure", tiny, "--device", "cpu", "--context", "24", "--new-tokens", "4", "--out", out)
    first = vramcal(*args)
    assert first.returncode == 0, first.stderr
    again = vramcal(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (f"already measured: qwen-tiny bfloat16 sdpa generate b1 20+4 is record 1 of "
                                    f"{out} (status ok); --repeat measures it again")
    assert len(read_records(out)) == 1
    # a sweep of the same case agrees: already there
    sweep = vramcal("sweep", sweep_file(tmp_path, [tiny]), "--out", out)
    assert sweep.returncode == 0 and "1 already in" in sweep.stdout and "0 to run" in sweep.stdout
    repeated = vramcal(*args, "--repeat")
    assert repeated.returncode == 0, repeated.stderr
    assert repeated.stdout.startswith("ok ")
    assert len(read_records(out)) == 2


# ---- bad configs: exit 2 and nothing written; errors while measuring stay records -----------------
def test_measure_of_a_config_that_cannot_be_built_is_exit_2_and_writes_nothing(tmp_path):
    broken = _config(tmp_path, "qwen2.5-0.5b", {**QWEN_TINY, "model_type": "nosuchtype"}, "broken")
    out = tmp_path / "m.jsonl"
    line = one_line(vramcal("measure", broken, "--device", "cpu", "--context", "24", "--out", out),
                    "broken cannot be built", "nosuchtype", "nothing was measured")
    assert len(line) < 400
    assert not out.exists()


def test_sweep_with_a_config_that_cannot_be_built_measures_nothing(tmp_path, tiny):
    broken = _config(tmp_path, "qwen2.5-0.5b", {**QWEN_TINY, "model_type": "nosuchtype"}, "broken")
    out = tmp_path / "s.jsonl"
    # the good model comes first in the sweep: still nothing is measured
    one_line(vramcal("sweep", sweep_file(tmp_path, [tiny, broken]), "--out", out),
             "broken cannot be built", "nothing was measured")
    assert not out.exists()


def test_a_crash_while_measuring_is_still_a_record(tmp_path, tiny):
    out = tmp_path / "m.jsonl"
    result = vramcal("measure", tiny, "--device", "cpu", "--context", "24", "--out", out,
                     env={"VRAMCAL_TEST_CRASH_KEY": "qwen-tiny"})
    assert result.returncode == 1, result.stderr
    (rec,) = read_records(out)
    assert rec["status"] == "error" and "exited with status 3 during this case" in rec["error"]


# ---- contexts beyond the model's positions -------------------------------------------------------
def test_measure_beyond_learned_positions_is_refused(tmp_path, gpt2_tiny):
    out = tmp_path / "m.jsonl"
    one_line(vramcal("measure", gpt2_tiny, "--device", "cpu", "--context", "100", "--out", out),
             "gpt2-tiny (gpt2) has learned absolute position embeddings for 64 positions",
             "cannot run 100 tokens")
    assert not out.exists()
    # the catalogue's gpt2 at 5,000 tokens: refused in the parent, before a worker starts
    one_line(vramcal("measure", "gpt2", "--device", "cpu", "--context", "5000", "--out", out),
             "gpt2 (gpt2) has learned absolute position embeddings for 1,024 positions")
    assert not out.exists()


def test_sweep_beyond_learned_positions_is_refused_before_any_case(tmp_path, tiny, gpt2_tiny):
    out = tmp_path / "s.jsonl"
    path = sweep_file(tmp_path, [tiny, gpt2_tiny], contexts=(24, 100, 200))
    line = one_line(vramcal("sweep", path, "--out", out), "tiny.toml", "learned absolute position embeddings",
                    "2 cases, the first: gpt2-tiny", "lower its contexts")
    assert "cannot run 100 tokens" in line
    assert not out.exists()  # the qwen cases, fine, were not measured either
    dry = vramcal("sweep", path, "--out", out, "--dry-run")
    one_line(dry, "learned absolute position embeddings")


def test_beyond_rotary_positions_runs_with_a_note(tmp_path):
    short = _config(tmp_path, "qwen2.5-0.5b", {**QWEN_TINY, "max_position_embeddings": 16}, "qwen-short")
    out = tmp_path / "m.jsonl"
    result = vramcal("measure", short, "--device", "cpu", "--context", "24", "--new-tokens", "4", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "vramcal: note: context 24 is beyond qwen-short's 16 trained positions" in result.stderr
    (rec,) = read_records(out)
    assert rec["status"] == "ok"


# ---- missing extras ------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["torch", "transformers"])
def test_measure_without_torch_or_transformers_names_the_extra(tmp_path, tiny, module):
    out = tmp_path / "m.jsonl"
    result = vramcal("measure", tiny, "--device", "cpu", "--context", "24", "--out", out,
                     env=hide_modules(tmp_path, module))
    one_line(result, f"{module} is not installed; install the harness extra: pip install 'vramcal[harness]'")
    assert not out.exists()


def test_sweep_without_torch_names_the_extra_and_measures_nothing(tmp_path, tiny):
    out = tmp_path / "s.jsonl"
    result = vramcal("sweep", sweep_file(tmp_path, [tiny]), "--out", out, env=hide_modules(tmp_path, "torch"))
    one_line(result, "torch is not installed", "pip install 'vramcal[harness]'")
    assert not out.exists()
    # a dry run needs no torch
    dry = vramcal("sweep", sweep_file(tmp_path, [tiny]), "--out", out, "--dry-run",
                  env=hide_modules(tmp_path, "torch"))
    assert dry.returncode == 0, dry.stderr


@pytest.mark.parametrize("command", ["measure", "sweep"])
def test_without_jsonschema_nothing_is_measured(tmp_path, tiny, command):
    """The records are validated when appended: without jsonschema a measurement would be lost."""
    out = tmp_path / "m.jsonl"
    env = hide_modules(tmp_path, "jsonschema")
    if command == "measure":
        result = vramcal("measure", tiny, "--device", "cpu", "--context", "24", "--out", out, env=env)
    else:
        result = vramcal("sweep", sweep_file(tmp_path, [tiny]), "--out", out, env=env)
    one_line(result, "jsonschema is not installed; install the harness extra")
    assert not out.exists()


def test_cuda_measure_without_nvml_names_the_extra(tmp_path, tiny):
    result = vramcal("measure", tiny, "--context", "24", "--out", tmp_path / "m.jsonl",
                     env=hide_modules(tmp_path, "pynvml"))
    one_line(result, "pynvml is not installed", "pip install 'vramcal[harness]'", "use --device cpu")


# ---- CPU records against the estimate of what the tracker measures --------------------------------
def test_cpu_progress_line_compares_with_the_allocated_estimate(tmp_path):
    """The llama-3.2-1b architecture cut to 2 layers (its 128k vocabulary kept): the tracker's peak is within
    a few percent of the estimate's allocated peak less the cuBLAS workspace (with the workspace, or against
    the GPU total, it was tens of percent above; for a 1 MiB model, thousands)."""
    small = _config(tmp_path, "llama-3.2-1b", {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
                                               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64},
                    "llama-small")
    out = tmp_path / "m.jsonl"
    result = vramcal("measure", small, "--device", "cpu", "--context", "64", "--new-tokens", "4", "--out", out)
    assert result.returncode == 0, result.stderr
    match = re.search(r"estimate [\d.]+ MiB \(([+-][\d.]+)%\)", result.stdout)
    assert match, result.stdout
    assert abs(float(match.group(1))) < 10, result.stdout
    # and validate --device cpu scores the same record the same way
    scored = vramcal("validate", out, "--device", "cpu", "--json")
    assert scored.returncode == 0, scored.stderr
    summary = json.loads(scored.stdout)["summary"]
    assert summary["n"] == 1 and summary["median_abs_error"] < 0.10
    assert abs(summary["median_abs_error"] - abs(float(match.group(1))) / 100) < 0.002
