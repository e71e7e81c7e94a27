#!/usr/bin/env bash
# How long `make venv` takes to build the environment with pip (the baseline) and with uv (what the Makefile
# uses), measured in the same run, each on a fresh virtual environment in a temporary folder. Both install the
# same requirements.lock; the script checks that the two environments hold the same packages. Package caches
# (~/.cache/pip, ~/.cache/uv) are whatever this machine has (the README's figures: both warm); uv compiles no
# bytecode up front, pip does (Python writes it on first import otherwise).
#   bash benchmarks/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
declare -A secs
for installer in pip uv; do
  start=$(date +%s%N)
  make --no-print-directory venv VENV="$tmp/$installer" INSTALLER=$installer > "$tmp/$installer.log" 2>&1
  secs[$installer]=$(( ($(date +%s%N) - start) / 1000000 ))  # ms
  grep -q "installed with $installer\|installing with $installer" "$tmp/$installer.log" \
    || { echo "$installer did not do the install:"; grep -v '^WARNING: Location' "$tmp/$installer.log"; exit 1; }
  "$tmp/$installer/bin/python" -m pip freeze --exclude-editable 2>/dev/null | grep -v '^uv==' | sort > "$tmp/$installer.txt"
done
diff -q "$tmp/pip.txt" "$tmp/uv.txt" >/dev/null || { echo "the environments differ:"; diff "$tmp/pip.txt" "$tmp/uv.txt"; exit 1; }
printf 'packages: %s (the same in both)\n' "$(wc -l < "$tmp/uv.txt")"
python3 -c "import sys; p, u = (int(a) / 1000 for a in sys.argv[1:]); print(f'pip: {p:.1f} s   uv: {u:.1f} s   pip / uv: {p / u:.1f}x')" "${secs[pip]}" "${secs[uv]}"
