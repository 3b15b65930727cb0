"""An independent reference of Ouro (ByteDance's natively looped LM) in PyTorch, float64.

Written from the published equations (shared/docs/looped-models.md), not from rrt's code, to
check rrt against: reads a Hugging Face Ouro directory (config.json, *.safetensors) and writes

  OUT.logits   float32 little-endian, steps x tokens x vocab: each loop step's logits
  OUT.json     {"gates": steps x tokens (gate logits), "exit_steps": {threshold: per token
                the 1-based step it exits at}, "cdf": steps x tokens, "generate": {threshold:
                greedy continuation ids}}

Layer (no biases): h = x + n2(attn(n1(x))); out = h + n4(mlp(n3(h))), RMSNorm in every n.
Step t = all L layers, then the final norm; the normed state is step t's output (logits via
lm_head) and step t+1's input. KV per (step, layer), never shared (here: no cache at all,
every token recomputed). Gate on each step's output: lambda_t = sigmoid(w . h + b);
p_t = lambda_t * prod_{j<t} (1 - lambda_j) for t < T-1, the last step the remainder; a token
exits at the first step whose cumulative p reaches the threshold; 1.0 runs every step.

Usage: python ouro_reference.py MODEL_DIR --tokens 1,2,3 --out PREFIX
         [--thresholds 0.5,0.9,1.0] [--generate 12]
"""

import argparse
import json
import math
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

torch.set_default_dtype(torch.float64)


def load(model_dir):
    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    w = {}
    for f in sorted(d.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            w[k] = v.to(torch.float64)
    return cfg, w


def rmsnorm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, theta):
    """NeoX-style (rotate-half) rotary embedding of x: tokens x heads x head_dim, positions 0.."""
    n, _, d = x.shape
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(q, k, v):
    """Causal attention; q: tokens x heads x d, k/v: tokens x kv_heads x d."""
    n, heads, d = q.shape
    rep = heads // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    s = s.masked_fill(mask, float("-inf"))
    p = s.softmax(-1)
    return torch.einsum("hij,jhd->ihd", p, v).reshape(n, heads * d)


def layer(x, w, i, cfg):
    eps = cfg["rms_norm_eps"]
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    p = f"model.layers.{i}"
    a = rmsnorm(x, w[f"{p}.input_layernorm.weight"], eps)
    q = (a @ w[f"{p}.self_attn.q_proj.weight"].T).reshape(-1, heads, hd)
    k = (a @ w[f"{p}.self_attn.k_proj.weight"].T).reshape(-1, kvh, hd)
    v = (a @ w[f"{p}.self_attn.v_proj.weight"].T).reshape(-1, kvh, hd)
    q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
    o = attention(q, k, v) @ w[f"{p}.self_attn.o_proj.weight"].T
    h = x + rmsnorm(o, w[f"{p}.input_layernorm_2.weight"], eps)
    m = rmsnorm(h, w[f"{p}.post_attention_layernorm.weight"], eps)
    g = m @ w[f"{p}.mlp.gate_proj.weight"].T
    u = m @ w[f"{p}.mlp.up_proj.weight"].T
    f = (torch.nn.functional.silu(g) * u) @ w[f"{p}.mlp.down_proj.weight"].T
    return h + rmsnorm(f, w[f"{p}.post_attention_layernorm_2.weight"], eps)


def forward(cfg, w, tokens):
    """Per step: logits (tokens x vocab) and gate logits (tokens)."""
    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    logits, gates = [], []
    for _ in range(cfg["total_ut_steps"]):
        for i in range(cfg["num_hidden_layers"]):
            x = layer(x, w, i, cfg)
        x = rmsnorm(x, w["model.norm.weight"], cfg["rms_norm_eps"])
        logits.append(x @ w["lm_head.weight"].T)
        gates.append((x @ w["model.early_exit_gate.weight"].T)[:, 0] + w["model.early_exit_gate.bias"][0])
    return logits, gates


def exit_probabilities(gates):
    """p_t per token (steps x tokens): lambda_t * prod_{j<t}(1 - lambda_j), the last the rest."""
    steps = len(gates)
    lam = [g.sigmoid() for g in gates]
    surv = torch.ones_like(lam[0])
    p = []
    for t in range(steps):
        if t < steps - 1:
            p.append(lam[t] * surv)
            surv = surv * (1 - lam[t])
        else:
            p.append(surv)
    return p


def exit_steps(gates, threshold):
    """1-based step each token exits at."""
    steps = len(gates)
    n = gates[0].shape[0]
    if threshold >= 1.0:
        return [steps] * n
    cdf = torch.stack(exit_probabilities(gates)).cumsum(0)
    out = []
    for i in range(n):
        t = next((t for t in range(steps - 1) if cdf[t, i] >= threshold), steps - 1)
        out.append(t + 1)
    return out


def generate(cfg, w, tokens, n_new, threshold):
    """Greedy, every token recomputed at full depth; the token is read at its exit step."""
    seq = list(tokens)
    new = []
    for _ in range(n_new):
        logits, gates = forward(cfg, w, seq)
        t = exit_steps([g[-1:] for g in gates], threshold)[0]
        nxt = int(logits[t - 1][-1].argmax())
        new.append(nxt)
        seq.append(nxt)
    return new


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--thresholds", default="0.5,0.9,1.0")
    ap.add_argument("--generate", type=int, default=0)
    a = ap.parse_args()
    cfg, w = load(a.model)
    tokens = [int(t) for t in a.tokens.split(",")]
    thresholds = [float(t) for t in a.thresholds.split(",")]
    logits, gates = forward(cfg, w, tokens)
    with open(a.out + ".logits", "wb") as f:
        for step in logits:
            f.write(struct.pack(f"<{step.numel()}f", *step.flatten().tolist()))
    cdf = torch.stack(exit_probabilities(gates)).cumsum(0)
    res = {
        "steps": cfg["total_ut_steps"],
        "vocab": cfg["vocab_size"],
        "gates": [g.tolist() for g in gates],
        "cdf": cdf.tolist(),
        "exit_steps": {str(t): exit_steps(gates, t) for t in thresholds},
        "generate": {str(t): generate(cfg, w, tokens, a.generate, t) for t in thresholds} if a.generate else {},
    }
    Path(a.out + ".json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
