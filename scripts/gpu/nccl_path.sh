#!/usr/bin/env bash
# Prints `export LD_LIBRARY_PATH=…` for a folder where libnccl.so links to the NCCL that PyTorch's nvidia-nccl wheel
# ships (libnccl.so.2, a name cudarc does not try), unless the system already has libnccl.so. Use it as
#   eval "$(scripts/gpu/nccl_path.sh)"
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then exit 0; fi
lib=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site, sys
dirs = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for d in dirs:
    for f in glob.glob(os.path.join(d, "nvidia", "nccl", "lib", "libnccl.so*")):
        print(f); raise SystemExit
PY
)
if [ -z "$lib" ]; then echo "echo 'no libnccl found (pip install nvidia-nccl-cu13)' >&2"; exit 0; fi
mkdir -p /tmp/qpeft-nccl && ln -sfn "$lib" /tmp/qpeft-nccl/libnccl.so
echo "export LD_LIBRARY_PATH=/tmp/qpeft-nccl\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
