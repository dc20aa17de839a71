#!/usr/bin/env bash
# The GPU check on a fresh GPU machine, in one command; it installs nothing and needs no network:
#     bench/gpu_first_run.sh OUT [more bench/gpu_check.py flags, e.g. --budget-minutes 10]
# OUT/machine.txt   the GPU, driver, Python and package versions, and the git commit
# OUT/checks.jsonl  a line per check as it ends; OUT/RESULTS-entry.md the entry to copy into bench/RESULTS.md
# OUT/log.txt       everything the check printed
# It exits with the check's status. Python: $PYTHON, else .venv/bin/python if there is one, else python3.
set -u -o pipefail
out=${1:?usage: bench/gpu_first_run.sh OUT [bench/gpu_check.py flags]}
shift
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

{
    date -u
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    git status --short 2>/dev/null
    nvidia-smi || true
    echo "C compiler (Triton builds its launchers with it): $(command -v cc gcc | head -1)"
    "$python" - <<'EOF'
import importlib.metadata, platform, sys
print(f"Python {platform.python_version()} at {sys.executable}; installed:")
print(*sorted(f"  {d.metadata['Name']} {d.version}" for d in importlib.metadata.distributions()), sep="\n")
try:
    import torch
except ImportError:
    sys.exit()
print(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, GPUs {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    print(f"  {i}: {torch.cuda.get_device_name(i)}, compute capability {torch.cuda.get_device_capability(i)}")
EOF
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

PYTHONUNBUFFERED=1 "$python" bench/gpu_check.py --out "$out" --results "$out/RESULTS-entry.md" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
