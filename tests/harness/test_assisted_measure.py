"""Assisted generation in the harness, on the CPU: generate(assistant_model=...) and prompt lookup, measured.

References: transformers 5.17's own assisted loop (``_assisted_decoding``) run for real on tiny models; the
draft's weights counted by hand from its config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from estimator.errors import UserError  # noqa: E402
from estimator.records import validate_record  # noqa: E402
from harness.case import Case  # noqa: E402
from harness.worker import Session  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MAIN = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192, "bos_token_id": 1, "eos_token_id": 2}
DRAFT = dict(MAIN, num_hidden_layers=1, hidden_size=128, intermediate_size=256, head_dim=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    base = json.loads((REPO / "configs" / "models" / "llama-3.2-1b.json").read_text())
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for name, sizes in (("main", MAIN), ("draft", DRAFT)):
        path = folder / f"{name}.json"
        path.write_text(json.dumps(dict(base, **sizes)))
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def session():
    s = Session("cpu")
    yield s
    s.close()


def draft_weights_bytes() -> int:
    """llama, tied embeddings: vocab x hidden + per layer q, k, v, o, gate, up, down, 2 norms + final norm,
    bf16; plus the rotary buffers inv_freq and original_inv_freq (head_dim / 2 fp32 each)."""
    H, I, L, nh, nkv, d, V = (DRAFT[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads", "head_dim",
                                                 "vocab_size"))
    per_layer = H * nh * d + 2 * H * nkv * d + nh * d * H + 3 * H * I + 2 * H
    return (V * H + L * per_layer + H) * 2 + 2 * (d // 2) * 4


def test_assisted_case_is_measured_with_both_models(models, session):
    main, draft = models
    plain = session.run_case(Case.make(main, device="cpu", context=512, new_tokens=8))
    rec = session.run_case(Case.make(main, device="cpu", context=512, new_tokens=8, assistant=draft,
                                     num_assistant_tokens=4))
    for r in (plain, rec):
        validate_record(r)
        assert r["status"] == "ok", r["error"]
    assert rec["assistant"] == "draft" and rec["num_assistant_tokens"] == 4
    assert rec["assistant_weights_bytes"] == draft_weights_bytes()
    assert rec["weights_bytes"] == plain["weights_bytes"]  # the main model's own
    assert rec["case_key"] != plain["case_key"] and rec["case_key"].endswith("assistant=draft:k4")
    # the draft's weights, cache and candidate forwards are held on top of the main model's run
    assert rec["peak_allocated_bytes"] >= plain["peak_allocated_bytes"] + rec["assistant_weights_bytes"]
    assert rec["kv_cache_bytes"] == plain["kv_cache_bytes"]  # the main cache, cropped to the context


def test_prompt_lookup_case(models, session):
    main, _ = models
    rec = session.run_case(Case.make(main, device="cpu", context=512, new_tokens=8, prompt_lookup_num_tokens=4))
    validate_record(rec)
    assert rec["status"] == "ok" and rec["prompt_lookup_num_tokens"] == 4 and "assistant" not in rec


@pytest.mark.parametrize("kw, match", [
    ({"batch": 2, "assistant": "DRAFT"}, "batch 1 only"),
    ({"num_assistant_tokens": 3}, "needs --assistant"),
    ({"assistant": "DRAFT", "prompt_lookup_num_tokens": 3}, "give one"),
    ({"assistant": "DRAFT", "cache": "static"}, "dynamic only"),
    ({"assistant": "no-such-model"}, "unknown model"),
])
def test_bad_assisted_cases_are_refused(models, kw, match):
    main, draft = models
    kw = {k: draft if v == "DRAFT" else v for k, v in kw.items()}
    with pytest.raises(UserError, match=match):
        Case.make(main, device="cpu", context=512, **kw)
