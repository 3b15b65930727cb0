#!/usr/bin/env python3
"""Writes a copy of a GGUF file with every tensor dequantized to F32 (same metadata, same tensor
names and layouts). llama.cpp runs such a file without quantizing activations, which isolates
the effect of its Q8 activation quantization in the reference comparisons.

    python3 scripts/gguf_to_f32.py IN.gguf OUT.gguf
"""
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

src, dst = sys.argv[1], sys.argv[2]
r = GGUFReader(src)
arch = r.fields["general.architecture"].contents()
w = GGUFWriter(dst, arch)
for key, field in r.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
        continue
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
    else:
        w.add_key_value(key, field.contents(), vtype)
for t in r.tensors:
    a = dequantize(t.data, t.tensor_type).astype(np.float32)
    w.add_tensor(t.name, a.reshape([int(d) for d in reversed(t.shape)]))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print("wrote", dst)
