"""The kernels' source and NVRTC through ctypes, shared by flash_bench.py (on the GPU machine) and ptx_check.py (here):
both compile kernels.cu + flash.cu as qpeft does at run time, with the libnvrtc of the torch wheel's nvidia packages."""
import ctypes
import glob
import os
import sys

CUDA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "crates", "qpeft", "src", "backend", "cuda")


def find(pattern):
    """The first path matching `pattern` (a glob, ** allowed) under a directory of sys.path."""
    for d in sys.path:
        hits = sorted(glob.glob(os.path.join(d, pattern), recursive=True))
        if hits:
            return hits[0]
    sys.exit(f"{pattern} not found under {sys.path} (run with a python that has torch's nvidia packages)")


def source(cuda_dir=CUDA_DIR):
    """kernels.cu followed by flash.cu, as `SOURCE` in backend/cuda/mod.rs."""
    return "".join(open(os.path.join(cuda_dir, f)).read() for f in ("kernels.cu", "flash.cu"))


def compile_ptx(src, arch, f16):
    """PTX of `src` for `arch` (e.g. compute_90), with QPEFT_F16 defined for the f16 mode; exits with NVRTC's log on
    an error."""
    nvrtc = ctypes.CDLL(find("nvidia/**/libnvrtc.so*"))
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernels.cu", 0, None, None) != 0:
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"-arch={arch}".encode()] + ([b"-DQPEFT_F16"] if f16 else [])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.exit(f"NVRTC failed:\n{log.value.decode()}")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    return ptx.value
