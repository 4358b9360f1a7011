# Sourced by scripts/test and scripts/swarm: make .venv with everything installed, once.
# Re-installs when pyproject.toml changes. Set P2PDILOCO_TORCH to install another torch
# (for example "torch" for a CUDA build); the default is the CPU build CI uses.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${P2PDILOCO_VENV:-$root/.venv}
torch_spec=${P2PDILOCO_TORCH:-torch==2.13.0}
python=${PYTHON:-python3}
stamp_id=$("$python" -c 'import hashlib,sys; print(hashlib.sha1(open(sys.argv[1],"rb").read()+sys.argv[2].encode()).hexdigest()[:12])' "$root/pyproject.toml" "$torch_spec")
if [ ! -f "$venv/.installed-$stamp_id" ]; then
    echo "setting up $venv (torch: $torch_spec) ..." >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$torch_spec"
    "$venv/bin/python" -m pip install -q -e "$root[dev]"
    rm -f "$venv"/.installed-*
    touch "$venv/.installed-$stamp_id"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
