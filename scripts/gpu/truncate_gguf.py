"""Writes the first K blocks of a GGUF model as a smaller GGUF (same tokenizer, metadata and tensor bytes; the
block count set to K), so that real SmolLM2 weights fit the GPU machine's 64 MiB carry:

    /work/refvenv/bin/python scripts/gpu/truncate_gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
        .devmodel/smollm2-6l.gguf 6

Uses gguf-py (PyPI `gguf`) for reading and writing; copies fields and tensors unchanged otherwise."""
import sys

import gguf


def main() -> None:
    src, dst, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    blocks_key = f"{arch}.block_count"
    if keep < 1 or keep > reader.fields[blocks_key].contents():
        sys.exit(f"{src} has {reader.fields[blocks_key].contents()} blocks; cannot keep {keep}")
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = keep if field.name == blocks_key else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    tensors = [t for t in reader.tensors if not (t.name.startswith("blk.") and int(t.name.split(".")[1]) >= keep)]
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


if __name__ == "__main__":
    main()
