"""`--compile auto|off` (issue 11): where transformers 5.17's generate compiles the decode step on CUDA
(_valid_auto_compile_criteria: a compileable, i.e. static, cache; no disable_compile; a quantizer whose
is_compileable is True; get_compiled_call: not llama4), the estimate says the compiled memory is not modelled
and widens its interval by the stated rule (estimator/estimate.py COMPILE_*)."""

import json
import subprocess
import sys

from estimator.catalogue import load_model
from estimator.coefficients import select_coefficients
from estimator.estimate import COMPILE_ABS_BYTES, COMPILE_HIGH_REL, COMPILE_LOW_REL, compiles, estimate
from estimator.terms import Workload


def test_what_transformers_compiles():
    static = dict(context=1024, cache="static", compile="auto")
    assert compiles(Workload(**static))
    assert not compiles(Workload(context=1024, compile="auto"))  # DynamicCache is not compileable
    assert not compiles(Workload(**{**static, "compile": "off"}))  # disable_compile=True
    assert not compiles(Workload(**static, workload="forward"))  # no generate
    assert not compiles(Workload(**static, new_tokens=1))  # no decode step
    assert not compiles(Workload(**static), model_type="llama4_text")  # get_compiled_call returns __call__
    assert not compiles(Workload(**static, quant="gptq-int4"))  # GptqHfQuantizer.is_compileable: False
    assert compiles(Workload(**static, quant="torchao-int8wo"))  # TorchAoHfQuantizer.is_compileable: True
    assert Workload.from_record({"workload": "generate", "prompt_tokens": 8, "new_tokens": 4, "batch_size": 1,
                                 "dtype": "bfloat16", "cache_implementation": "static"}).compile == "off"


def test_a_compiled_decode_widens_the_interval_by_the_stated_rule_and_says_so():
    spec, c = load_model("llama-3.1-8b"), select_coefficients("transformers")
    off = estimate(spec, Workload(context=4096, cache="static", compile="off"), c)
    auto = estimate(spec, Workload(context=4096, cache="static", compile="auto"), c)
    assert auto.total_bytes == off.total_bytes  # the eager step, replayed: the point estimate is the same
    iv = c.interval
    assert auto.high_bytes == round(auto.total_bytes * (1 + iv["high"]) * (1 + COMPILE_HIGH_REL) + COMPILE_ABS_BYTES)
    assert auto.low_bytes == round(auto.total_bytes * (1 + iv["low"]) * (1 - COMPILE_LOW_REL))
    assert (off.low_bytes, off.high_bytes) == (round(off.total_bytes * (1 + iv["low"])),
                                                round(off.total_bytes * (1 + iv["high"])))
    assert any("uncalibrated" in n and "CUDA graphs" in n for n in auto.notes)
    assert not any("CUDA graphs" in n for n in off.notes)
    assert auto.as_dict()["compiled_decode"] and auto.as_dict()["inputs"]["compile"] == "auto"


def test_cli_compile_defaults_to_what_transformers_does():
    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "vramcal", "estimate", "qwen2.5-0.5b", "--cache", "static",
                            "--json", *extra], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    assert run()["compiled_decode"] and not run("--compile", "off")["compiled_decode"]
    r = subprocess.run([sys.executable, "-m", "vramcal", "estimate", "qwen2.5-0.5b", "--compile", "always"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--compile" in r.stderr
