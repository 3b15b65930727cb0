#!/usr/bin/env python3
"""Quantization fixtures: f32 rows and the Q8_0 / Q4_1 blocks the `gguf` Python package
(llama.cpp's numpy port of `quantize_row_q8_0_ref` / `quantize_row_q4_1_ref`, bit-exact with
ggml) makes of them. rrt's quantizers (`rrt_model::quant::quantize_q8_0` / `quantize_q4_1`)
must reproduce them byte for byte.

    python3 scripts/make_quantize_fixtures.py fixtures/gguf

Writes `quantize_input.f32` (ROWS x COLS little-endian f32), `quantize_q8_0.bin` and
`quantize_q4_1.bin` (the blocks, row after row) and `quantize.json` (sizes, version of gguf).
Rows cover the edge cases (zero and constant blocks, exact halves after scaling, one outlier,
tiny values with subnormal f16 scales, large values, negative-only blocks) and random normals.
"""
import json
import os
import sys

from importlib.metadata import version

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

out = sys.argv[1]
rng = np.random.default_rng(4321)
COLS = 128  # 4 blocks per row

rows = []
# Zero block, constant block, constant negative block, a block with one non-zero value.
rows.append(np.concatenate([np.zeros(32), np.full(32, 0.75), np.full(32, -3.0), np.eye(1, 32, 7)[0] * 2.0]))
# Exact halves: amax 127 makes d = 1 (Q8_0), so x * id = k + 0.5 exactly; likewise for Q4_1
# with min 0, max 15 (d = 1, (x - min) * id + 0.5 = k + 1 or k + 0.5).
halves = np.array([127.0, -127.0] + [k + 0.5 for k in range(-15, 15)])
q41 = np.array([0.0, 15.0] + [k * 0.5 for k in range(30)])
rows.append(np.concatenate([halves, -halves, q41, q41[::-1] - 7.5]))
# One outlier per block, tiny values (subnormal f16 scales), large values, negative only.
outlier = rng.standard_normal(32) * 0.01
outlier[5] = 3.0
rows.append(np.concatenate([outlier, rng.standard_normal(32) * 1e-6, rng.standard_normal(32) * 1e3,
                            -np.abs(rng.standard_normal(32)) - 0.5]))
# Nibble order: value j and value j + 16 of each block differ.
rows.append(np.tile(np.concatenate([np.arange(16.0), 15.0 - np.arange(16.0)]) * 0.1, 4))
# Random normals at weight-like scales.
for s in [0.02, 0.05, 0.1, 1.0]:
    for _ in range(6):
        rows.append(rng.standard_normal(COLS) * s)
x = np.stack(rows).astype("<f4")
assert x.shape[1] == COLS and np.isfinite(x).all()

x.tofile(os.path.join(out, "quantize_input.f32"))
sizes = {}
for t, name in [(Q.Q8_0, "q8_0"), (Q.Q4_1, "q4_1")]:
    blocks = quantize(x, t)
    assert blocks.dtype == np.uint8 and blocks.shape[0] == x.shape[0]
    blocks.tofile(os.path.join(out, f"quantize_{name}.bin"))
    sizes[name] = int(blocks.size)
meta = {"rows": int(x.shape[0]), "cols": COLS, "bytes": sizes, "gguf": version("gguf")}
json.dump(meta, open(os.path.join(out, "quantize.json"), "w"), indent=1)
print("wrote", x.shape[0], "rows to", out, meta)
