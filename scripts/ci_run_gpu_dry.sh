#!/usr/bin/env bash
# CI: the GPU acceptance script's dry run on this CPU (bash bench/run_gpu.sh --dry-run), so that
# the one-shot GPU plan cannot rot between lent machines. Fails when the run fails (any step
# FAIL or TIMEOUT) or when what it leaves in OUT breaks the device tool's limits on what comes
# back: at most 8 files, no more than 2 folders down, names of letters, digits, '.', '_' and '-',
# 16 MiB a file, 64 MiB in all; and when the verdict would not survive the tool's 12,000-character
# output tail.
#
#   bash scripts/ci_run_gpu_dry.sh          (from the repository root, after `make test`: .venv)
#   PYTHON=... bash scripts/ci_run_gpu_dry.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || { echo "ci_run_gpu_dry: $PYTHON not found (run make test first)" >&2; exit 1; }
export PYTHON
out=$(mktemp -d "${TMPDIR:-/tmp}/uk_dry_out.XXXXXX")
log=$(mktemp "${TMPDIR:-/tmp}/uk_dry_log.XXXXXX")
trap 'rm -rf "$out" "$log"' EXIT

start=$SECONDS
echo "[ci_run_gpu_dry] bash bench/run_gpu.sh --dry-run $out (python: $PYTHON)"
rc=0
bash bench/run_gpu.sh --dry-run "$out" >"$log" 2>&1 || rc=$?
cat "$log"
echo "[ci_run_gpu_dry] run_gpu.sh exited $rc after $((SECONDS - start)) s"

problems=()
[[ $rc == 0 ]] || problems+=("run_gpu.sh --dry-run exited $rc (a step failed or timed out: see the steps above)")
# The dry run's tiny plan must finish: a step cut short (PARTIAL) means its budget no longer fits.
if grep -qE "^PARTIAL |no time left in the" "$log"; then
    problems+=("a step was cut short or skipped for time: the dry run no longer fits its budget")
fi

# The device tool's limits on what comes back from $OUT.
mapfile -t files < <(cd "$out" && find . -mindepth 1 -type f | sed 's|^\./||' | sort)
(( ${#files[@]} <= 8 )) || problems+=("${#files[@]} files in OUT, the device tool returns at most 8")
total=0
for f in "${files[@]}"; do
    size=$(stat -c %s "$out/$f")
    total=$((total + size))
    depth=$(tr -cd '/' <<<"$f" | wc -c)
    (( depth <= 2 )) || problems+=("$f is $depth folders down (at most 2 come back)")
    [[ $f =~ ^[A-Za-z0-9._/-]+$ ]] || problems+=("$f: a name the device tool does not return")
    (( size <= 16 * 1024 * 1024 )) || problems+=("$f is $size bytes (16 MiB at most)")
done
(( total <= 64 * 1024 * 1024 )) || problems+=("OUT holds $total bytes (64 MiB at most)")
others=$(cd "$out" && find . -mindepth 1 ! -type f ! -type d | wc -l)
(( others == 0 )) || problems+=("$others links or special files in OUT (the tool does not return them)")

# The files the plan promises, the dry-run label, and the verdict inside the output's last 12,000
# characters.
for f in summary.txt env.txt tests.txt bench.txt results.json results.md plots.png; do
    [[ -s $out/$f ]] || problems+=("$f missing or empty")
done
grep -q "DRY RUN: CPU, not GPU numbers" "$out/summary.txt" 2>/dev/null \
    || problems+=("summary.txt does not say it is a dry run")
grep -q "dry run: CPU, not GPU numbers" "$out/results.md" 2>/dev/null \
    || problems+=("results.md does not say it is a dry run")
"$PYTHON" -c 'import json, sys; d = json.load(open(sys.argv[1])); sys.exit(not (d["dry_run"] and d["benches"] and all(b["rows"] for b in d["benches"].values())))' \
    "$out/results.json" 2>/dev/null || problems+=("results.json: not marked dry_run, or a bench without rows")
tail -c 12000 "$log" | grep -q "^RESULT: " || problems+=("the RESULT line is not within the output's last 12,000 characters")
tail -c 12000 "$log" | grep -q "^== steps" || problems+=("the step table is not within the output's last 12,000 characters")

echo "[ci_run_gpu_dry] OUT: ${#files[@]} files, $total bytes: ${files[*]}"
if (( ${#problems[@]} )); then
    printf '[ci_run_gpu_dry] FAIL: %s\n' "${problems[@]}" >&2
    exit 1
fi
echo "[ci_run_gpu_dry] OK in $((SECONDS - start)) s"
