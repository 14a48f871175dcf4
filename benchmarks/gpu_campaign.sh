#!/usr/bin/env bash
# The GPU campaign of issue 16 in one command: GPU tests, the H200 smoke sweep (H100 reference cases),
# the cross-check against the reference, the targeted campaign sweep and the LoRA sweep under one time
# budget, the H100 coefficients validated on what was measured, and the harness's throughput.
#
#   benchmarks/gpu_campaign.sh [OUT_DIR]          # OUT_DIR: $OUT when set (the device tool), else results/h200-run
#
# Environment: CAMPAIGN_BUDGET_S (default 420): seconds from the start after which no case starts (each
#   sweep gets `vramcal sweep --time-budget` with what is left; the case in flight finishes and is recorded);
#   CAMPAIGN_DRY_RUN=1: on a machine without a GPU, expand every sweep (`--dry-run`), print the time plan
#   (benchmarks/campaign_plan.py) and measure one tiny sweep on the CPU end to end; PYTHON (default python3).
# Records are appended per case to OUT_DIR/{smoke,campaign,lora}.jsonl and the whole log goes through tee
# to OUT_DIR/campaign.log, so a run cut at its limit still returns what it measured. Records already in
# results/h200/ are copied to OUT_DIR first: a rerun resumes (the sweeps skip cases already measured).
# The progress bars are off (TQDM_DISABLE=1): the log keeps one line per case. Wheels in .whl/ (jsonschema and its needs, absent on the H200 image) are installed to /tmp/site first.
# harness/README.md ("GPU campaign") gives the device call and what to commit afterwards.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT_DIR=${OUT:-${1:-results/h200-run}}
BUDGET_S=${CAMPAIGN_BUDGET_S:-420}
DRY=${CAMPAIGN_DRY_RUN:-0}
PY=${PYTHON:-python3}
LORA_RESERVE_S=40  # kept back from the campaign sweep for the LoRA sweep when peft imports
mkdir -p "$OUT_DIR" || exit 2
exec > >(tee -a "$OUT_DIR/campaign.log") 2>&1
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$SECONDS
left() { local s=$(( BUDGET_S - (SECONDS - T0) )); (( s > 1 )) && echo "$s" || echo 1; }
step() { echo; echo "=== [$(( SECONDS - T0 )) s of $BUDGET_S] $*"; }
SWEEPS=(smoke campaign lora)

step "environment ($(date -u +%FT%TZ), out: $OUT_DIR, dry run: $DRY)"
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import jsonschema" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" && echo "installed to /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - "$DRY" <<'EOF'
import importlib, importlib.metadata, platform, sys
print("python", platform.python_version())
missing = []
for name in ("torch", "transformers", "accelerate", "pynvml", "jsonschema", "tqdm", "peft", "pandas", "scipy"):
    try:
        importlib.import_module(name)
        try:
            version = importlib.metadata.version({"pynvml": "nvidia-ml-py"}.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            version = "(no metadata)"
        print(f"{name} {version}")
    except ImportError as exc:
        print(f"{name} MISSING ({exc})")
        missing += [name] if name in ("torch", "transformers", "jsonschema", "tqdm") else []
import torch
print("cuda", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
sys.exit(1 if missing else 3 if sys.argv[1] != "1" and not torch.cuda.is_available() else 0)
EOF
status=$?
if (( status == 3 )); then
  echo "gpu_campaign: no CUDA GPU is visible here; nothing was measured (without one: CAMPAIGN_DRY_RUN=1)"; exit 2
elif (( status != 0 )); then
  echo "gpu_campaign: a package the harness needs is missing (above); nothing was measured"; exit 2
fi
# estimator/_replay (the C allocator) is not built there: the Python replay answers the estimate filter with the
# same bytes (78 campaign estimates take about 1 s with VRAMCAL_PYTHON_REPLAY=1 on the CPU machine)
HAVE_PEFT=0; "$PY" -c "import peft" 2>/dev/null && HAVE_PEFT=1
declare -A BEFORE
for s in "${SWEEPS[@]}"; do
  if [[ -s results/h200/$s.jsonl && ! -e $OUT_DIR/$s.jsonl ]]; then
    cp "results/h200/$s.jsonl" "$OUT_DIR/$s.jsonl" && echo "resuming from results/h200/$s.jsonl"
  fi
  BEFORE[$s]=$( [[ -e $OUT_DIR/$s.jsonl ]] && wc -l <"$OUT_DIR/$s.jsonl" || echo 0)
done

step "GPU tests (pytest -m gpu)"
timeout 150 "$PY" -m pytest -m gpu tests/harness/test_gpu.py tests/harness/test_gpu_multigpu.py -q -rs \
  -p no:cacheprovider || echo "gpu_campaign: the GPU tests failed or timed out (status $?); the sweeps go on"

sweep() {  # sweep NAME BUDGET_S: one sweep file into OUT_DIR/NAME.jsonl, cut at the budget
  local name=$1 budget=$2
  step "sweep h200-$name (time budget $budget s)"
  if [[ $DRY == 1 ]]; then
    "$PY" -m vramcal sweep "configs/sweeps/h200-$name.toml" --out "$OUT_DIR/$name.jsonl" --dry-run
  else  # the outer timeout only guards against a case that hangs past the budget
    timeout $(( budget + 120 )) "$PY" -m vramcal sweep "configs/sweeps/h200-$name.toml" --out "$OUT_DIR/$name.jsonl" \
      --time-budget "$budget"
  fi
  echo "sweep h200-$name: exit status $?"
}

sweep smoke "$(left)"
if [[ $DRY != 1 && -s $OUT_DIR/smoke.jsonl ]]; then
  step "cross-check: smoke records against the H100 reference (2%)"
  "$PY" -m calibration.crosscheck "$OUT_DIR/smoke.jsonl" | tee "$OUT_DIR/crosscheck.txt"
fi
budget=$(left); (( HAVE_PEFT && budget > 2 * LORA_RESERVE_S )) && budget=$(( budget - LORA_RESERVE_S ))
sweep campaign "$budget"
if (( HAVE_PEFT )); then
  sweep lora "$(left)"
else
  step "sweep h200-lora skipped: peft does not import here (the harness extra's LoRA adapters need it)"
fi

if [[ $DRY == 1 ]]; then
  step "dry run: the time plan on one GPU (benchmarks/campaign_plan.py)"
  "$PY" benchmarks/campaign_plan.py configs/sweeps/h200-{smoke,campaign,lora}.toml --budget "$BUDGET_S"
  step "dry run: one tiny sweep measured on the CPU end to end"
  "$PY" - "$OUT_DIR" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
config = json.loads(pathlib.Path("configs/models/qwen2.5-0.5b.json").read_text())
config.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=4096, max_window_layers=2)
(out / "tiny-qwen.json").write_text(json.dumps(config))
(out / "tiny.toml").write_text(f'name = "tiny"\ndevice = "cpu"\nskip_over_estimate = 0\nnew_tokens = [4]\n'
                               f'[[matrix]]\nmodels = ["{(out / "tiny-qwen.json").resolve()}"]\n'
                               'contexts = [24, 40]\nbatches = [1, 2]\n')
EOF
  "$PY" -m vramcal sweep "$OUT_DIR/tiny.toml" --out "$OUT_DIR/dry-cpu.jsonl" --time-budget "$(left)"
  echo "tiny sweep: exit status $?"
  step "dry run: the cross-check step on the reference itself (every figure +0.00%)"
  "$PY" -m calibration.crosscheck results/reference/h100-transformers-5.17.jsonl | tail -5
fi

measured=()
for s in "${SWEEPS[@]}"; do [[ -s $OUT_DIR/$s.jsonl ]] && measured+=("$OUT_DIR/$s.jsonl"); done
if [[ $DRY != 1 && ${#measured[@]} -gt 0 ]]; then
  step "the H100 coefficients on what was measured (vramcal validate)"
  timeout 120 "$PY" -m vramcal validate "${measured[@]}" --coefficients results/coefficients/transformers-h100.json \
    || echo "vramcal validate: exit status $?"
fi

step "summary"
"$PY" - "$OUT_DIR" "$(( SECONDS - T0 ))" "${SWEEPS[0]}=${BEFORE[${SWEEPS[0]}]}" "${SWEEPS[1]}=${BEFORE[${SWEEPS[1]}]}" \
  "${SWEEPS[2]}=${BEFORE[${SWEEPS[2]}]}" <<'EOF'
import collections, json, pathlib, sys
out, wall_s = pathlib.Path(sys.argv[1]), float(sys.argv[2])
ok = inside_s = 0
for arg in sys.argv[3:]:
    name, before = arg.split("=")
    path = out / f"{name}.jsonl"
    lines = path.read_text().splitlines()[int(before):] if path.is_file() else []
    recs = [json.loads(line) for line in lines if line.strip()]
    counts = collections.Counter(r["status"] for r in recs)
    ok += counts["ok"]
    inside_s += sum(r["duration_s"] for r in recs)
    print(f"{name}: {len(recs)} records this run ({dict(counts)}) -> {path}")
print(f"campaign throughput: {ok} ok cases in {wall_s:.0f} s = {ok / (wall_s / 60):.1f} ok cases per device-minute; "
      f"{max(0.0, 1 - inside_s / wall_s):.0%} of the time outside the measured workloads (tests, starts, builds, checks)")
EOF
[[ -s $OUT_DIR/crosscheck.txt ]] && { echo "cross-check verdict (crosscheck.txt):"; tail -n 4 "$OUT_DIR/crosscheck.txt"; }
echo "gpu_campaign: done in $(( SECONDS - T0 )) s; log: $OUT_DIR/campaign.log"
