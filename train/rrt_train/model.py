"""The forward pass of a relaxed recursive checkpoint in PyTorch, equal to `rrt`'s.

Unrolled layer `l` (0 .. L-1) runs shared layer `l mod K` with the LoRAs of `l`:

    h = RMSNorm(x) * attn_norm;  q,k,v = h W^T + (h A_l^T) B_l^T;  RoPE (rotate half) on q, k
    x = x + attn(q, k, v) W_o^T + LoRA_o;  h = RMSNorm(x) * ffn_norm
    x = x + (silu(h W_g^T + LoRA_g) * (h W_u^T + LoRA_u)) W_d^T + LoRA_d

After every loop (every K layers) the hidden state can be decoded by the shared final norm and
LM head: that is what early exit uses and what the intermediate-loop losses train. Every
parameter is a leaf `nn.Parameter` named after its checkpoint tensor, so `to_tensors()` writes
the same format back.

An optional learned exit gate (`exit_gate`, Ouro's: one `Linear(hidden -> 1)` shared by every
loop) reads each loop's output as `forward` returns it, the residual stream *before* the final
norm (the state `rrt`'s engine holds after a loop of a Llama-family checkpoint):
`g_t = w . h_t + b`, `lambda_t = sigmoid(g_t)` the probability of exiting after loop t given the
token has not exited before (`gate_logits`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ck


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((xf * scale) * w.float()).to(x.dtype)


def inv_frequencies(arch: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (f64) and the position multiplier, as `RopeTable::new` computes."""
    rot = arch["rope_dim"]
    theta = float(arch["rope_theta"])
    half = rot // 2
    inv = torch.tensor([1.0 / theta ** ((2 * i) / rot) for i in range(half)], dtype=torch.float64)
    pos_scale = 1.0
    s = arch.get("rope_scaling") or {"type": "none"}
    kind = s.get("type", "none")
    if kind == "none":
        pass
    elif kind == "linear":
        pos_scale = 1.0 / float(s["factor"])
    elif kind == "llama3":
        factor, lo, hi, orig = (float(s[k]) for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position"))
        low_wavelen, high_wavelen = orig / lo, orig / hi
        out = []
        for f in inv.tolist():
            wavelen = 2.0 * math.pi / f
            if wavelen > low_wavelen:
                f = f / factor
            elif wavelen >= high_wavelen:
                smooth = (orig / wavelen - lo) / (hi - lo)
                f = (1.0 - smooth) * f / factor + smooth * f
            out.append(f)
        inv = torch.tensor(out, dtype=torch.float64)
    elif kind == "factors":
        inv = inv / torch.tensor(s["factors"], dtype=torch.float64)
    else:
        raise ck.CheckpointError(f"unknown rope_scaling type {kind!r}")
    return inv, pos_scale


class Lora(nn.Module):
    def __init__(self, rank: int, out_dim: int, in_dim: int):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(rank, in_dim))
        self.b = nn.Parameter(torch.zeros(out_dim, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a.t().to(x.dtype)) @ self.b.t().to(x.dtype)


class SharedLayer(nn.Module):
    def __init__(self, arch: dict):
        super().__init__()
        h = arch["hidden"]
        self.attn_norm = nn.Parameter(torch.ones(h))
        self.ffn_norm = nn.Parameter(torch.ones(h))
        for m, (o, i) in ck.module_dims(arch).items():
            setattr(self, m, nn.Parameter(torch.zeros(o, i)))


class ExitGate(nn.Module):
    """`g = w . h + b` (`w`: `[1, hidden]`, `b`: `[1]`), computed in f32 whatever `h`'s dtype."""

    def __init__(self, hidden: int, bias: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden))
        self.bias = nn.Parameter(torch.full((1,), float(bias)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h.float() @ self.weight.float().t()).squeeze(-1) + self.bias.float()


class RecursiveLM(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        arch, rec = cfg["architecture"], cfg["recursion"]
        self.arch = arch
        self.K, self.B, self.L = rec["shared_layers"], rec["loops"], arch["n_layers"]
        h, v = arch["hidden"], arch["vocab"]
        self.embed = nn.Parameter(torch.zeros(v, h))
        self.norm = nn.Parameter(torch.ones(h))
        self.lm_head = None if arch["tie_embeddings"] else nn.Parameter(torch.zeros(v, h))
        self.shared = nn.ModuleList(SharedLayer(arch) for _ in range(self.K))
        dims = ck.module_dims(arch)
        self.lora = nn.ModuleList(
            nn.ModuleDict({m: Lora(rec["ranks"][m], *dims[m]) for m in ck.MODULES if rec["ranks"][m] > 0})
            for _ in range(self.L)
        )
        self.exit_gate = ExitGate(h) if ck.has_exit_gate(cfg) else None
        inv, self.pos_scale = inv_frequencies(arch)
        self.register_buffer("inv_freq", inv, persistent=False)
        self._rope_cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- the checkpoint contract -------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path) -> "RecursiveLM":
        cfg, tensors = ck.read(path)
        model = cls(cfg)
        model.load_tensors(tensors)
        return model

    def named_tensors(self) -> dict[str, nn.Parameter]:
        """Checkpoint tensor name -> parameter."""
        out: dict[str, nn.Parameter] = {"embed": self.embed, "norm": self.norm}
        if self.lm_head is not None:
            out["lm_head"] = self.lm_head
        for k, layer in enumerate(self.shared):
            out[f"shared.{k}.attn_norm"] = layer.attn_norm
            out[f"shared.{k}.ffn_norm"] = layer.ffn_norm
            for m in ck.MODULES:
                out[f"shared.{k}.{m}"] = getattr(layer, m)
        for li, mods in enumerate(self.lora):
            for m, lo in mods.items():
                out[f"lora.{li}.{m}.a"] = lo.a
                out[f"lora.{li}.{m}.b"] = lo.b
        if self.exit_gate is not None:
            out["exit_gate.weight"] = self.exit_gate.weight
            out["exit_gate.bias"] = self.exit_gate.bias
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.named_tensors().items():
                t = tensors[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ck.CheckpointError(f"tensor {name!r}: shape {tuple(t.shape)} != {tuple(p.shape)}")
                p.copy_(t)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.named_tensors().items()}

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for li in self.lora for lo in li.values() for p in (lo.a, lo.b)]

    def add_exit_gate(self, bias: float = -2.0) -> ExitGate:
        """Gives the model a new exit gate (weight 0, `bias`: every loop's exit probability
        starts at `sigmoid(bias)`) and records it in its config (`"exit_gate": true`)."""
        if self.exit_gate is not None:
            raise ValueError("the model already has an exit gate")
        self.exit_gate = ExitGate(self.arch["hidden"], bias).to(self.embed.device)
        self.cfg["exit_gate"] = True
        return self.exit_gate

    def gate_logits(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """The exit gate's logit `[N, T]` (f32) of every loop output `hidden[t]` (as `forward`
        returns them: before the final norm), the same quantity `rrt`'s `gate_logits` computes."""
        if self.exit_gate is None:
            raise ValueError("the model has no exit gate")
        return [self.exit_gate(h) for h in hidden]

    # ---- forward -----------------------------------------------------------------------
    def _rope(self, t: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (t, str(device))
        if key not in self._rope_cache:
            pos = torch.arange(t, dtype=torch.float64) * self.pos_scale
            ang = pos[:, None] * self.inv_freq.cpu()[None, :]
            # f64 angles, cast to f32 as the Rust table does.
            self._rope_cache[key] = (ang.cos().float().to(device), ang.sin().float().to(device))
        cos, sin = self._rope_cache[key]
        return cos.to(dtype), sin.to(dtype)

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [N, heads, T, head_dim]; rotate the first rope_dim dims, pairs (i, i + half).
        half = cos.shape[-1]
        a, b, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        c, s = cos[None, None], sin[None, None]
        return torch.cat([a * c - b * s, b * c + a * s, rest], dim=-1)

    def _attention(self, q, k, v, t: int) -> torch.Tensor:
        a = self.arch
        group = a["n_heads"] // a["n_kv_heads"]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        window = a.get("sliding_window")
        if window:
            i = torch.arange(t, device=q.device)
            d = i[:, None] - i[None, :]
            mask = (d >= 0) & (d < window)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(a["head_dim"]))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(a["head_dim"]))

    def _linear(self, x, w, li: int, m: str):
        y = x @ w.t().to(x.dtype)
        lo = self.lora[li][m] if m in self.lora[li] else None
        if lo is not None:
            y = y + lo(x)
        return y

    def layer(self, li: int, x: torch.Tensor, cos, sin) -> torch.Tensor:
        a = self.arch
        n, t, _ = x.shape
        w = self.shared[li % self.K]
        eps = a["rms_eps"]
        hd, nh, nkv = a["head_dim"], a["n_heads"], a["n_kv_heads"]
        h = rmsnorm(x, w.attn_norm, eps)
        q = self._linear(h, w.q, li, "q").view(n, t, nh, hd).transpose(1, 2)
        k = self._linear(h, w.k, li, "k").view(n, t, nkv, hd).transpose(1, 2)
        v = self._linear(h, w.v, li, "v").view(n, t, nkv, hd).transpose(1, 2)
        q, k = self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin)
        att = self._attention(q, k, v, t).transpose(1, 2).reshape(n, t, nh * hd)
        x = x + self._linear(att, w.o, li, "o")
        h = rmsnorm(x, w.ffn_norm, eps)
        act = F.silu(self._linear(h, w.gate, li, "gate")) * self._linear(h, w.up, li, "up")
        return x + self._linear(act, w.down, li, "down")

    def forward(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Hidden states after every loop (`B` tensors `[N, T, hidden]`, before the final norm)."""
        dtype = dtype or self.embed.dtype
        n, t = ids.shape
        if t > self.arch["max_positions"]:
            raise ValueError(f"{t} positions exceed the model's context of {self.arch['max_positions']}")
        x = F.embedding(ids, self.embed).to(dtype)
        cos, sin = self._rope(t, ids.device, dtype)
        outs = []
        for li in range(self.L):
            x = self.layer(li, x, cos, sin)
            if li % self.K == self.K - 1:
                outs.append(x)
        return outs

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: logits `[..., vocab]`."""
        w = self.embed if self.lm_head is None else self.lm_head
        h = rmsnorm(hidden, self.norm, self.arch["rms_eps"])
        return h @ w.t().to(h.dtype)

    def loop_logits(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        return [self.head(h) for h in self.forward(ids, dtype)]


def random_config(
    tokenizer_cfg: dict | None = None,
    *,
    vocab: int = 256,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 4,
    loops: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    rank: int = 8,
    tie: bool = True,
) -> dict:
    """The config of a tiny model (tests; `rrt-train tiny`)."""
    head_dim = hidden // heads
    return {
        "format": ck.FORMAT,
        "version": ck.VERSION,
        "architecture": {
            "family": "llama",
            "hidden": hidden,
            "intermediate": intermediate,
            "n_layers": layers,
            "n_heads": heads,
            "n_kv_heads": kv_heads,
            "head_dim": head_dim,
            "vocab": vocab,
            "rms_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_dim": head_dim,
            "rope_scaling": {"type": "none"},
            "max_positions": 2048,
            "sliding_window": None,
            "tie_embeddings": tie,
        },
        "recursion": {
            "loops": loops,
            "shared_layers": layers // loops,
            "init": "average",
            "ranks": {m: rank for m in ck.MODULES},
        },
        "exit": {"criterion": None, "thresholds": [], "target_agreement": None, "calibration": None},
        "tokenizer": tokenizer_cfg or {"bos": 1, "eog": [0, 2], "bos_text": None, "eos_text": None, "add_bos": False, "manual_bos": False},
        "chat_template": None,
        "provenance": {"source": "random", "source_sha256": "0" * 64, "tool": "rrt-train tiny", "extra": {}},
    }


def random_model(cfg: dict, seed: int = 0) -> RecursiveLM:
    """Random weights at a scale where every loop matters (tests)."""
    g = torch.Generator().manual_seed(seed)
    m = RecursiveLM(cfg)
    with torch.no_grad():
        for name, p in m.named_tensors().items():
            if name.endswith("norm"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return m
