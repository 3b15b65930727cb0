#!/usr/bin/env python3
"""Dequantization fixtures: one small GGUF holding a tensor of every supported type, plus the
values the `gguf` Python package (llama.cpp's own reference implementation in numpy) computes
for them. rrt's dequantization must reproduce them exactly.

    python3 scripts/make_quant_fixtures.py fixtures/gguf

Quantized blocks are random bytes (every bit pattern is a valid block) with their f16 scale
fields overwritten by sane random values, so every code path of each format is exercised.
"""
import json
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

out = sys.argv[1]
rng = np.random.default_rng(1234)
ROWS, COLS = 2, 512

# Byte offsets of f16 scale fields within one block, per type.
SCALES = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]

w = GGUFWriter(os.path.join(out, "quant_types.gguf"), "llama")
expected, index = [], []
for t in TYPES:
    n = ROWS * COLS
    if t == Q.F32:
        raw = rng.standard_normal(n).astype("<f4").view(np.uint8)
    elif t == Q.F16:
        raw = rng.standard_normal(n).astype("<f2").view(np.uint8)
    elif t == Q.BF16:
        raw = (rng.standard_normal(n).astype("<f4").view("<u4") >> 16).astype("<u2").view(np.uint8)
    else:
        blk, size = GGML_QUANT_SIZES[t]
        nb = n // blk
        raw = rng.integers(0, 256, size=nb * size, dtype=np.uint8).reshape(nb, size)
        for off in SCALES[t]:
            sc = (rng.uniform(0.001, 0.1, size=nb) * rng.choice([-1, 1], size=nb)).astype("<f2")
            raw[:, off:off + 2] = sc.view(np.uint8).reshape(nb, 2)
        raw = raw.reshape(-1)
    vals = dequantize(raw, t).astype("<f4").reshape(-1)
    assert vals.size == n and np.isfinite(vals).all()
    name = f"t_{t.name.lower()}"
    bytes_per_row = raw.size // ROWS
    w.add_tensor(name, raw.reshape(ROWS, bytes_per_row), raw_dtype=t)
    index.append({"name": name, "type": t.name, "rows": ROWS, "cols": COLS, "offset": int(sum(e.size for e in expected))})
    expected.append(vals)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
np.concatenate(expected).astype("<f4").tofile(os.path.join(out, "quant_types_expected.f32"))
json.dump({"tensors": index}, open(os.path.join(out, "quant_types.json"), "w"), indent=1)
print("wrote", len(TYPES), "tensors to", out)
