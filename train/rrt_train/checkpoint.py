"""Reading and writing the relaxed recursive checkpoint format (version 1).

A directory with `rrt_checkpoint.json` (architecture, recursion, exits, tokenizer facts, chat
template, provenance), `model.safetensors` (f32 tensors `embed`, `norm`, `lm_head` when untied,
`shared.{k}.{attn_norm,ffn_norm,q,k,v,o,gate,up,down}` as `out x in`, `lora.{l}.{m}.a`
(`rank x in`) and `.b` (`out x rank`); with `"exit_gate": true` in the config also the learned exit
gate `exit_gate.weight` (`1 x hidden`) and `exit_gate.bias` (`1`), read on each loop's output
before the final norm) and `tokenizer.json`. Mirrors `model/src/checkpoint.rs`.
Only f32 checkpoints (`"weights": "f32"`, or no `weights` field) are read here: quantized ones
(`q8_0`, `q4_1`: GGML blocks) are refused with the command that turns them back into f32.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "rrt-recursive-checkpoint"
VERSION = 1
CONFIG_FILE = "rrt_checkpoint.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
MODULES = ("q", "k", "v", "o", "gate", "up", "down")


class CheckpointError(ValueError):
    """A checkpoint that is missing, partial or inconsistent (the message names the file)."""


def module_dims(arch: dict) -> dict[str, tuple[int, int]]:
    """`(out, in)` of every linear map of a layer."""
    h, i = arch["hidden"], arch["intermediate"]
    qd = arch["n_heads"] * arch["head_dim"]
    kd = arch["n_kv_heads"] * arch["head_dim"]
    return {
        "q": (qd, h),
        "k": (kd, h),
        "v": (kd, h),
        "o": (h, qd),
        "gate": (i, h),
        "up": (i, h),
        "down": (h, i),
    }


def read_config(path: str | os.PathLike) -> dict:
    cpath = Path(path) / CONFIG_FILE
    try:
        cfg = json.loads(cpath.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{cpath}: not found (not an rrt checkpoint directory?)") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cpath}: invalid JSON: {e}") from e
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{cpath}: format {cfg.get('format')!r} is not {FORMAT!r}")
    if cfg.get("version") != VERSION:
        raise CheckpointError(f"{cpath}: checkpoint version {cfg.get('version')} is not supported (reads {VERSION})")
    weights = cfg.get("weights", "f32")
    if weights != "f32":
        raise CheckpointError(
            f"{cpath}: weights are stored as {weights} blocks; rrt-train reads f32 checkpoints "
            f"(`rrt quantize --model {Path(path)} --out DIR --quant f32` writes one)"
        )
    arch, rec = cfg["architecture"], cfg["recursion"]
    if rec["loops"] < 1 or rec["shared_layers"] * rec["loops"] != arch["n_layers"]:
        raise CheckpointError(
            f"{cpath}: {rec['shared_layers']} shared layers x {rec['loops']} loops != {arch['n_layers']} layers"
        )
    for m in MODULES:
        if m not in rec["ranks"]:
            raise CheckpointError(f"{cpath}: recursion.ranks has no entry for {m!r}")
    if not isinstance(cfg.get("exit_gate", False), bool):
        raise CheckpointError(f"{cpath}: exit_gate must be true or false, not {cfg['exit_gate']!r}")
    return cfg


def has_exit_gate(cfg: dict) -> bool:
    """Whether the checkpoint carries a learned exit gate (`"exit_gate": true`; absent: no)."""
    return bool(cfg.get("exit_gate", False))


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold, with its shape."""
    arch, rec = cfg["architecture"], cfg["recursion"]
    h, v = arch["hidden"], arch["vocab"]
    dims = module_dims(arch)
    shapes: dict[str, tuple[int, ...]] = {"embed": (v, h), "norm": (h,)}
    if not arch["tie_embeddings"]:
        shapes["lm_head"] = (v, h)
    for k in range(rec["shared_layers"]):
        shapes[f"shared.{k}.attn_norm"] = (h,)
        shapes[f"shared.{k}.ffn_norm"] = (h,)
        for m in MODULES:
            shapes[f"shared.{k}.{m}"] = dims[m]
    for layer in range(arch["n_layers"]):
        for m in MODULES:
            r = rec["ranks"][m]
            if r:
                o, i = dims[m]
                shapes[f"lora.{layer}.{m}.a"] = (r, i)
                shapes[f"lora.{layer}.{m}.b"] = (o, r)
    if has_exit_gate(cfg):
        shapes["exit_gate.weight"] = (1, h)
        shapes["exit_gate.bias"] = (1,)
    return shapes


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and every tensor (f32, CPU), checked for presence, shape and finiteness."""
    cfg = read_config(path)
    wpath = Path(path) / WEIGHTS_FILE
    if not wpath.exists():
        raise CheckpointError(f"{wpath}: not found")
    tensors = load_file(str(wpath))
    for name, shape in expected_shapes(cfg).items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{wpath}: tensor {name!r} is missing")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{wpath}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{wpath}: tensor {name!r} holds NaN or Inf")
    return cfg, {k: v.float() for k, v in tensors.items()}


def write(path: str | os.PathLike, cfg: dict, tensors: dict[str, torch.Tensor], tokenizer_from: str | os.PathLike | None) -> None:
    """Writes a checkpoint directory atomically (a sibling temporary directory renamed into
    place), f32 tensors, `tokenizer.json` copied from `tokenizer_from`."""
    path = Path(path)
    shapes = expected_shapes(cfg)
    missing = set(shapes) - set(tensors)
    if missing:
        raise CheckpointError(f"{path}: tensors missing before write: {sorted(missing)[:5]}")
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    out = {k: tensors[k].detach().to(device="cpu", dtype=torch.float32).contiguous() for k in shapes}
    save_file(out, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    if tokenizer_from is not None:
        src = Path(tokenizer_from) / TOKENIZER_FILE
        if src.exists():
            shutil.copyfile(src, tmp / TOKENIZER_FILE)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)

