#!/usr/bin/env python3
"""An independent float64 reference of the Llama forward pass, written with numpy on top of the
`gguf` package's own dequantization. It reads the GGUF tensors as stored (q/k rows in
llama.cpp's permuted order) and applies RoPE in llama.cpp's interleaved-pair convention, so it
shares no code or layout decisions with rrt.

    python3 scripts/make_numpy_reference.py models/SmolLM2-135M-Instruct.Q4_1.gguf fixtures/reference

Writes the full last-position logits (little-endian f32) and all-position top-5 ids for a few
prompts given as ids.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

path, out = sys.argv[1], sys.argv[2]  # out: a directory
r = GGUFReader(path)
f = {k: v for k, v in r.fields.items()}


def meta(key):
    return f[key].contents()


T = {t.name: t for t in r.tensors}


def W(name):
    t = T[name]
    a = dequantize(t.data, t.tensor_type).astype(np.float64)
    return a.reshape([int(d) for d in reversed(t.shape)])


n_layer = meta("llama.block_count")
n_head = meta("llama.attention.head_count")
n_kv = meta("llama.attention.head_count_kv")
hidden = meta("llama.embedding_length")
eps = meta("llama.attention.layer_norm_rms_epsilon")
theta = meta("llama.rope.freq_base")
hd = hidden // n_head

emb = W("token_embd.weight")
layers = []
for i in range(n_layer):
    p = f"blk.{i}."
    layers.append({k: W(p + k + ".weight") for k in
                   ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]})
out_norm = W("output_norm.weight")
head = W("output.weight") if "output.weight" in T else emb


def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_interleaved(x, pos):
    # x: (n, heads, hd); pairs (2i, 2i+1) rotate by pos * theta^(-2i/hd)  (llama.cpp NORM mode)
    i = np.arange(hd // 2)
    ang = pos[:, None] * theta ** (-2.0 * i / hd)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    y = np.empty_like(x)
    y[..., 0::2] = x0 * c - x1 * s
    y[..., 1::2] = x0 * s + x1 * c
    return y


def forward(ids):
    n = len(ids)
    x = emb[ids]
    pos = np.arange(n, dtype=np.float64)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for L in layers:
        h = rms(x, L["attn_norm"])
        q = rope_interleaved((h @ L["attn_q"].T).reshape(n, n_head, hd), pos)
        k = rope_interleaved((h @ L["attn_k"].T).reshape(n, n_kv, hd), pos)
        v = (h @ L["attn_v"].T).reshape(n, n_kv, hd)
        g = n_head // n_kv
        o = np.empty((n, n_head, hd))
        for hh in range(n_head):
            s = q[:, hh, :] @ k[:, hh // g, :].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o[:, hh, :] = s @ v[:, hh // g, :]
        x = x + o.reshape(n, hidden) @ L["attn_output"].T
        h = rms(x, L["ffn_norm"])
        gg = h @ L["ffn_gate"].T
        x = x + ((gg / (1 + np.exp(-gg))) * (h @ L["ffn_up"].T)) @ L["ffn_down"].T
    return rms(x, out_norm) @ head.T


PROMPTS = [
    [504, 3575, 282, 4649, 314],  # "The capital of France is"
    [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
    list(range(100, 140)),
]
cases = []
for ids in PROMPTS:
    logits = forward(np.array(ids))
    cases.append({"ids": ids, "last_logits": [float(v) for v in logits[-1]],
                  "top5": [[int(i) for i in np.argsort(-row)[:5]] for row in logits]})
meta = {"model": path.split("/")[-1], "cases": [{"ids": c["ids"], "top5": c["top5"]} for c in cases]}
json.dump(meta, open(out + "/smollm2_reference.json", "w"))
np.concatenate([np.array(c["last_logits"], dtype="<f4") for c in cases]).tofile(out + "/smollm2_last_logits.f32")
print("wrote", out)
