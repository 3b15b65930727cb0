"""`rrt-train` (or `python -m rrt_train`): train, eval, logits, gates, tiny."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from . import checkpoint as ck
from .data import Corpus, DataError
from .model import RecursiveLM, random_config, random_model
from .trainer import TrainConfig, TrainError, evaluate, pick_device, train


def _train_parser(sub):
    p = sub.add_parser("train", help="distil a converted checkpoint from the original model and train its exits")
    d = TrainConfig("", "", "", "")
    p.add_argument("--student", required=True, help="checkpoint written by `rrt convert`")
    p.add_argument("--teacher", required=True, help="the original model as a B = 1 checkpoint (`rrt convert --loops 1`)")
    p.add_argument("--data", required=True, help="corpus written by `rrt distill-data`")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--run", help="run directory (state, logs; default OUT.run)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("student", "teacher", "data", "out", "run", "resume", "allow_mismatch", "progress", "exit_gate"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=getattr(d, f.name))
    p.add_argument(
        "--exit-gate",
        action="store_true",
        help="train a learned exit gate next to the model (Ouro stage I: sum_t p(t) KL_t - beta H(p); "
        "--gate-beta, default 0.05; --gate-lr, default --lr; a new gate starts at --gate-init-bias, default -2)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --run")
    p.add_argument("--allow-mismatch", action="store_true", help="train even if student, teacher and data name different original models")
    p.add_argument("--no-progress", action="store_true")


def rounded(tensors: dict, to: str) -> dict:
    """The tensors with every float value rounded to bf16 or f16 (kept in their own dtype)."""
    if to == "none":
        return tensors
    dt = {"bf16": torch.bfloat16, "f16": torch.float16}[to]
    return {k: (v.to(dt).to(v.dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def _token_ids(text: str, m: RecursiveLM) -> torch.Tensor:
    ids = torch.tensor([[int(x) for x in text.split(",")]], dtype=torch.long)
    if ids.min() < 0 or ids.max() >= m.arch["vocab"]:
        raise ValueError(f"--tokens: ids must be in 0..{m.arch['vocab']}")
    return ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rrt-train", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    e = sub.add_parser("eval", help="held-out perplexity per loop and agreement with the last loop")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--teacher")
    e.add_argument("--seq", type=int, default=256)
    e.add_argument("--windows", type=int, default=16)
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto")
    lg = sub.add_parser("logits", help="per-loop logits of one token sequence (the round-trip check against rrt)")
    lg.add_argument("--model", required=True)
    lg.add_argument("--tokens", required=True, help="comma-separated token ids")
    lg.add_argument("--out", required=True, help="writes OUT (f32 little-endian, loops x tokens x vocab)")
    gt = sub.add_parser("gates", help="per-loop exit-gate logits of one token sequence (the round-trip check against rrt)")
    gt.add_argument("--model", required=True)
    gt.add_argument("--tokens", required=True, help="comma-separated token ids")
    gt.add_argument("--out", required=True, help="writes OUT as JSON: {\"gates\": [loops][tokens]}, every loop's g = w . h + b")
    t = sub.add_parser("tiny", help="write a tiny random checkpoint (tests)")
    t.add_argument("--out", required=True)
    t.add_argument("--tokenizer-from", help="checkpoint whose tokenizer.json, tokenizer facts and vocabulary to use")
    t.add_argument("--like", help="checkpoint (or its rrt_checkpoint.json's folder) whose architecture, tokenizer and chat template to copy at full size (random weights: throughput runs where the real weights cannot travel)")
    t.add_argument("--vocab", type=int, default=256)
    t.add_argument("--loops", type=int, default=2)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--untied", action="store_true")
    t.add_argument("--exit-gate", action="store_true", help="with a random learned exit gate")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--round", choices=["none", "bf16", "f16"], default="none", help="round every weight to this type's values (still stored f32): a GPU that keeps bf16/f16 weights then computes the same model as the CPU")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "train":
            fields = {f.name for f in dataclasses.fields(TrainConfig)}
            kw = {k: v for k, v in vars(a).items() if k in fields}
            kw["progress"] = not a.no_progress
            res = train(TrainConfig(**kw))
            print(json.dumps(res))
        elif a.cmd == "eval":
            c = TrainConfig("", "", "", "", device=a.device, dtype=a.dtype)
            device, dtype = pick_device(c)
            m = RecursiveLM.from_checkpoint(a.model).to(device)
            teacher = RecursiveLM.from_checkpoint(a.teacher).to(device) if a.teacher else None
            corpus = Corpus(a.data)
            corpus.check_vocab(m.arch["vocab"])
            print(json.dumps(evaluate(m, teacher, corpus.heldout_windows(a.seq, a.windows), device, dtype)))
        elif a.cmd == "gates":
            m = RecursiveLM.from_checkpoint(a.model)
            if m.exit_gate is None:
                raise ValueError(f"{a.model} has no exit gate (train with --exit-gate)")
            ids = _token_ids(a.tokens, m)
            with torch.no_grad():
                g = [x[0].tolist() for x in m.gate_logits(m.forward(ids))]
            Path(a.out).write_text(json.dumps({"tokens": ids[0].tolist(), "gates": g}))
            print(json.dumps({"loops": len(g), "tokens": ids.shape[1]}))
        elif a.cmd == "logits":
            m = RecursiveLM.from_checkpoint(a.model)
            ids = _token_ids(a.tokens, m)
            with torch.no_grad():
                z = torch.stack([x[0] for x in m.loop_logits(ids)])
            Path(a.out).write_bytes(z.float().contiguous().numpy().astype("<f4").tobytes())
            print(json.dumps({"shape": list(z.shape)}))
        elif a.cmd == "tiny":
            tok_cfg, vocab = None, a.vocab
            if a.like:
                src = ck.read_config(a.like)
                cfg = json.loads(json.dumps(src))
                arch = cfg["architecture"]
                if arch["n_layers"] % a.loops:
                    raise ValueError(f"--loops {a.loops} does not divide {arch['n_layers']} layers")
                dims = ck.module_dims(arch)
                cfg["recursion"] = {
                    "loops": a.loops,
                    "shared_layers": arch["n_layers"] // a.loops,
                    "init": "average",
                    "ranks": {m: min(a.rank, *dims[m]) if a.loops > 1 else 0 for m in ck.MODULES},
                }
                cfg["exit"] = {"criterion": None, "thresholds": [], "target_agreement": None, "calibration": None}
                cfg["provenance"] = {"source": "random", "source_sha256": "0" * 64, "tool": "rrt-train tiny --like", "extra": {}}
                cfg.pop("exit_gate", None)
                if a.exit_gate:
                    cfg["exit_gate"] = True
                m = random_model(cfg, a.seed)
                ck.write(a.out, cfg, rounded(m.to_tensors(), a.round), a.like)
                print(json.dumps({"out": a.out}))
                return 0
            if a.tokenizer_from:
                src = ck.read_config(a.tokenizer_from)
                tok_cfg, vocab = src["tokenizer"], src["architecture"]["vocab"]
            cfg = random_config(tok_cfg, vocab=vocab, layers=a.layers, loops=a.loops, rank=a.rank, tie=not a.untied)
            if a.exit_gate:
                cfg["exit_gate"] = True
            m = random_model(cfg, a.seed)
            ck.write(a.out, cfg, rounded(m.to_tensors(), a.round), a.tokenizer_from)
            print(json.dumps({"out": a.out}))
    except (ck.CheckpointError, DataError, TrainError, ValueError) as err:
        print(f"rrt-train: error: {err}", file=sys.stderr)
        return 2
    return 0
