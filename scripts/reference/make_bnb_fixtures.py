"""bitsandbytes 0.50.2 4-bit quantization fixtures (its CPU quantize_4bit / dequantize_4bit).
Run from the repository root:

    python scripts/reference/make_bnb_fixtures.py

Writes tests/fixtures/bnb/quant4.safetensors (every array widened to f32, exact for bytes and bf16)
and quant4.json (the parameters of each case).
"""
import json

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code
from safetensors.torch import save_file

assert bnb.__version__ == "0.50.2", bnb.__version__
torch.manual_seed(0)

CASES = [
    # shape, dtype, block, quant type, double quant, zero first block
    ((3, 130), torch.float32, 64, "nf4", True, False),
    ((5, 77), torch.bfloat16, 128, "fp4", False, False),
    ((2, 128), torch.float32, 64, "nf4", True, True),
    ((64, 512), torch.float32, 64, "nf4", True, False),
    ((64, 512), torch.bfloat16, 128, "nf4", True, False),
    ((33, 96), torch.float32, 64, "fp4", True, False),
    ((7, 64), torch.bfloat16, 64, "nf4", False, True),
    ((9, 96), torch.float32, 32, "nf4", True, False),
    ((12, 640), torch.bfloat16, 256, "fp4", True, False),
    ((3, 5000), torch.float32, 4096, "nf4", True, True),
]


def main():
    tensors, manifest = {}, []
    for i, (shape, dtype, block, qt, nested, zero) in enumerate(CASES):
        x = (torch.randn(shape) * torch.rand(shape[0], 1) * 3).to(dtype)
        if zero:
            x.view(-1)[:block] = 0
        packed, st = F.quantize_4bit(x, blocksize=block, compress_statistics=nested, quant_type=qt)
        deq = F.dequantize_4bit(packed, st)
        p = f"case{i}."
        tensors[p + "input"] = x.float().contiguous()
        tensors[p + "packed"] = packed.view(-1).float()
        tensors[p + "absmax"] = st.absmax.view(-1).float()
        tensors[p + "dequant"] = deq.float().contiguous()
        # bitsandbytes' AVX-512 CPU dequantize_4bit indexes the absmax per row, which is wrong when blocks
        # straddle rows (in_features % block != 0, e.g. case 5); the pure-torch "default" backend is the
        # reference for that layout.
        absmax = st.absmax if not nested else F.dequantize_blockwise(st.absmax, st.state2) + st.offset
        tensors[p + "dequant_default"] = _dequantize_4bit_compute(
            packed.view(-1), absmax.float(), _get_4bit_code(qt, x.device), block, shape, dtype).float().contiguous()
        if nested:
            tensors[p + "nested_absmax"] = st.state2.absmax.view(-1).float()
            tensors[p + "offset"] = st.offset.view(1).float()
        manifest.append({"case": i, "shape": list(shape), "dtype": str(dtype).split(".")[-1], "block": block,
                         "quant_type": qt, "double_quant": nested, "zero_block": zero})
    save_file(tensors, "tests/fixtures/bnb/quant4.safetensors")
    json.dump(manifest, open("tests/fixtures/bnb/quant4.json", "w"), indent=1)
    print(len(CASES), "cases")


if __name__ == "__main__":
    main()
