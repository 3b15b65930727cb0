"""The training loop: distillation from the original model with trained early exits.

A run directory holds `state.pt` (model and optimizer state, step, tokens seen, the data
generator's state: everything needed to resume exactly), `log.jsonl` (one line per step with the
loss of every loop, one per evaluation) and `args.json`. The trained model is written as a
checkpoint `rrt` serves unchanged; its provenance gains the recipe, and its exit thresholds are
cleared (they were calibrated for the untrained loops: run `rrt calibrate` on it).

With `exit_gate` (`--exit-gate`) a learned exit gate (one `Linear(hidden -> 1)` shared by every
loop, as Ouro's) trains next to the model on `loss.gate_objective`, from the detached hidden
states and per-token losses, with its own optimizer and gradient clipping: the model's updates
are bit-identical with and without it. A student that already has a gate (a checkpoint trained
with it) continues from its gate; a new gate starts with weight 0 and bias `gate_init_bias`
(exits rare). The output checkpoint carries the gate (`exit_gate.{weight,bias}`, `"exit_gate":
true`); `rrt calibrate --criterion gate` then sets its exit thresholds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import __version__
from . import checkpoint as ck
from .data import Corpus
from .loss import gate_objective, objective
from .model import RecursiveLM


class TrainError(ValueError):
    pass


@dataclasses.dataclass
class TrainConfig:
    student: str
    teacher: str
    data: str
    out: str
    run: str | None = None
    steps: int = 200
    stop_at: int = 0  # stop after this step (0: --steps); the schedule stays laid out for --steps
    batch: int = 8
    seq: int = 256
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    intermediate_weight: float = 0.1
    ce_weight: float = 0.0
    trainable: str = "all"  # all | lora
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, f32 on CPU) | f32 | bf16
    eval_every: int = 50
    eval_windows: int = 16
    save_every: int = 50
    seed: int = 0
    threads: int = 0
    resume: bool = False
    allow_mismatch: bool = False
    progress: bool = True
    exit_gate: bool = False  # train a learned exit gate (Ouro stage I objective)
    gate_beta: float = 0.05  # entropy weight beta of the gate objective
    gate_lr: float = 0.0  # the gate's peak learning rate (0: --lr), same schedule
    gate_init_bias: float = -2.0  # a new gate's bias: exit probability sigmoid(-2) = 0.12 per loop

    def run_dir(self) -> Path:
        return Path(self.run) if self.run else Path(str(self.out).rstrip("/") + ".run")


# Settings a resumed run must share with the run it continues.
RESUME_KEYS = (
    "student", "teacher", "data", "batch", "seq", "trainable", "seed", "intermediate_weight", "ce_weight",
    "exit_gate", "gate_beta", "gate_lr", "gate_init_bias",
)


def lr_at(c: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    span = max(c.steps - c.warmup, 1)
    t = min((step - c.warmup) / span, 1.0)
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def pick_device(c: TrainConfig) -> tuple[torch.device, torch.dtype]:
    if c.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(c.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"--device {c.device}: no CUDA device is available")
    if c.dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dt = {"f32": torch.float32, "bf16": torch.bfloat16}.get(c.dtype)
        if dt is None:
            raise TrainError(f"--dtype must be auto, f32 or bf16, not {c.dtype!r}")
    return dev, dt


@torch.no_grad()
def evaluate(
    student: RecursiveLM, teacher: RecursiveLM | None, windows: torch.Tensor, device, dtype, batch: int = 4, beta: float = 0.05
) -> dict:
    """Held-out perplexity of every loop (and the teacher), agreement of every loop's argmax
    with the last loop's, KL from the teacher per loop; with an exit gate, its exit
    distribution (mean probability of exiting after each loop, expected exit loop) and, with a
    teacher, its objective."""
    was = student.training
    student.eval()
    gated = student.exit_gate is not None and student.B > 1
    nll = [0.0] * student.B
    agree = [0.0] * student.B
    klt = [0.0] * student.B
    exit_p = [0.0] * student.B
    g_loss, g_exp, g_ent = 0.0, 0.0, 0.0
    t_nll, n = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch].to(device)
        inp, tgt = w[:, :-1], w[:, 1:]
        hidden = student.forward(inp, dtype)
        s = [student.head(h) for h in hidden]
        t = teacher.loop_logits(inp, dtype)[-1] if teacher is not None else None
        token_kl: list = []
        _, m = objective(s, t if t is not None else s[-1], tgt, token_kl=token_kl)
        k = inp.numel()
        n += k
        for b in range(student.B):
            nll[b] += m["ce"][b] * k
            agree[b] += m["agreement"][b] * k
            klt[b] += m["kl_teacher"][b] * k
        t_nll += m["teacher_ce"] * k
        if gated:
            _, gm = gate_objective(student.gate_logits(hidden[:-1]), token_kl, beta)
            for b in range(student.B):
                exit_p[b] += gm["exit_prob"][b] * k
            g_loss += gm["gate_loss"] * k
            g_exp += gm["expected_exit_loop"] * k
            g_ent += gm["gate_entropy"] * k
    student.train(was)
    out = {
        "eval_tokens": n,
        "ppl": [math.exp(x / n) for x in nll],
        "agreement": [x / n for x in agree],
    }
    if teacher is not None:
        out["teacher_ppl"] = math.exp(t_nll / n)
        out["kl_teacher"] = [x / n for x in klt]
    if gated:
        out["exit_prob"] = [x / n for x in exit_p]
        out["expected_exit_loop"] = g_exp / n
        out["gate_entropy"] = g_ent / n
        if teacher is not None:
            out["gate_loss"] = g_loss / n
    return out


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(c: TrainConfig) -> dict:
    if c.trainable not in ("all", "lora"):
        raise TrainError(f"--trainable must be all or lora, not {c.trainable!r}")
    if c.steps < 1 or c.batch < 1 or c.seq < 2:
        raise TrainError("--steps and --batch must be >= 1 and --seq >= 2")
    if c.stop_at < 0 or c.stop_at > c.steps:
        raise TrainError(f"--stop-at must be between 1 and --steps ({c.steps}), or 0 for --steps; got {c.stop_at}")
    if c.exit_gate and not (c.gate_beta >= 0 and math.isfinite(c.gate_beta)):
        raise TrainError(f"--gate-beta must be a number >= 0, not {c.gate_beta}")
    if c.exit_gate and not (c.gate_lr >= 0 and math.isfinite(c.gate_lr) and math.isfinite(c.gate_init_bias)):
        raise TrainError(f"--gate-lr must be >= 0 and --gate-init-bias finite (got {c.gate_lr}, {c.gate_init_bias})")
    if c.threads:
        torch.set_num_threads(c.threads)
    device, dtype = pick_device(c)
    run = c.run_dir()
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "state.pt"
    if state_path.exists() and not c.resume:
        raise TrainError(f"{run} already holds a run: pass --resume to continue it, or another --run")

    student = RecursiveLM.from_checkpoint(c.student)
    teacher = RecursiveLM.from_checkpoint(c.teacher)
    corpus = Corpus(c.data)
    s_cfg, t_cfg = student.cfg, teacher.cfg
    if s_cfg["architecture"]["vocab"] != t_cfg["architecture"]["vocab"]:
        raise TrainError("student and teacher vocabularies differ")
    corpus.check_vocab(s_cfg["architecture"]["vocab"])
    shas = {
        "student source": s_cfg["provenance"]["source_sha256"],
        "teacher source": t_cfg["provenance"]["source_sha256"],
        "corpus model": corpus.manifest.get("model_sha256"),
    }
    if len(set(shas.values())) != 1 and not c.allow_mismatch:
        raise TrainError(
            "the student, the teacher and the corpus do not come from the same original model "
            f"({shas}); pass --allow-mismatch to train anyway"
        )
    if c.seq > s_cfg["architecture"]["max_positions"]:
        raise TrainError(f"--seq {c.seq} exceeds the model's context of {s_cfg['architecture']['max_positions']}")
    # The exit gate: the student's own (a checkpoint trained with one), or a new one.
    gate_from = None
    if c.exit_gate:
        if student.B < 2:
            raise TrainError(f"--exit-gate: the student has {student.B} loop; an exit gate needs at least 2")
        if student.exit_gate is None:
            student.add_exit_gate(c.gate_init_bias)
            gate_from = f"new (weight 0, bias {c.gate_init_bias:g})"
        else:
            gate_from = "the student's"
    elif student.exit_gate is not None:
        print(
            f"rrt-train: warning: {c.student} has an exit gate; without --exit-gate it is written back unchanged "
            "(not trained for the new loops)",
            file=sys.stderr,
        )

    student.to(device)
    teacher.to(device=device, dtype=dtype if device.type == "cuda" else torch.float32)
    teacher.eval()
    teacher.requires_grad_(False)
    gate_params = list(student.exit_gate.parameters()) if student.exit_gate is not None else []
    gate_ids = {id(p) for p in gate_params}
    if c.trainable == "lora":
        student.requires_grad_(False)
        params = student.lora_parameters()
        if not params:
            raise TrainError("--trainable lora: the student has no LoRA (all ranks are 0)")
        for p in params:
            p.requires_grad_(True)
    else:
        params = [p for p in student.parameters() if id(p) not in gate_ids]
    for p in gate_params:
        p.requires_grad_(c.exit_gate)
    opt = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=c.weight_decay)
    # The gate's own optimizer and clipping: the model's updates do not depend on it.
    gate_opt = (
        torch.optim.AdamW(gate_params, lr=c.gate_lr or c.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        if c.exit_gate
        else None
    )
    gate_sched = dataclasses.replace(c, lr=c.gate_lr or c.lr)  # the same schedule at the gate's peak
    gen = torch.Generator().manual_seed(c.seed)
    step, tokens = 0, 0
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        old = st["config"]
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        for k in RESUME_KEYS:
            # A run saved before a setting existed ran with its default.
            if str(old.get(k, defaults.get(k))) != str(getattr(c, k)):
                raise TrainError(f"--resume: {k} was {old.get(k)!r} in {run}, now {getattr(c, k)!r}")
        student.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        if gate_opt is not None:
            gate_opt.load_state_dict(st["gate_optim"])
        gen.set_state(st["generator"])
        step, tokens = st["step"], st["tokens"]
    (run / "args.json").write_text(json.dumps(dataclasses.asdict(c), indent=2))
    windows = corpus.heldout_windows(c.seq, c.eval_windows)
    log = open(run / "log.jsonl", "a")

    def save_state():
        _atomic_save(
            {
                "config": dataclasses.asdict(c),
                "model": student.state_dict(),
                "optim": opt.state_dict(),
                "gate_optim": gate_opt.state_dict() if gate_opt is not None else None,
                "generator": gen.get_state(),
                "step": step,
                "tokens": tokens,
            },
            state_path,
        )

    def write_line(d):
        log.write(json.dumps(d) + "\n")
        log.flush()

    end = c.stop_at or c.steps
    bar = None
    if c.progress:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=step, unit="step", dynamic_ncols=True)
    student.train()
    t_start, tok_start = time.perf_counter(), tokens
    first_eval = None

    def run_eval():
        return evaluate(student, teacher, windows, device, dtype, beta=c.gate_beta)

    if step == 0:
        first_eval = run_eval()
        write_line({"eval": True, "step": 0, "tokens": 0, **first_eval})
    while step < end:
        lr = lr_at(c, step)
        gate_lr = lr_at(gate_sched, step)
        for g in opt.param_groups:
            g["lr"] = lr
        b = corpus.batch(c.batch, c.seq, gen).to(device)
        inp, tgt = b[:, :-1], b[:, 1:]
        with torch.no_grad():
            t_logits = teacher.loop_logits(inp, dtype)[-1]
        hidden = student.forward(inp, dtype)
        s_logits = [student.head(h) for h in hidden]
        token_kl: list = []
        loss, m = objective(s_logits, t_logits, tgt, c.intermediate_weight, c.ce_weight, token_kl=token_kl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip).item()
        opt.step()
        if gate_opt is not None:
            # On the detached loop outputs and losses: nothing flows back into the model.
            g_loss, gm = gate_objective(student.gate_logits([h.detach() for h in hidden[:-1]]), token_kl, c.gate_beta)
            for g in gate_opt.param_groups:
                g["lr"] = gate_lr
            gate_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            gm["gate_grad_norm"] = torch.nn.utils.clip_grad_norm_(gate_params, c.grad_clip).item()
            gate_opt.step()
            m.update(gm)
        step += 1
        tokens += inp.numel()
        elapsed = time.perf_counter() - t_start
        line = {"step": step, "tokens": tokens, "lr": lr, "grad_norm": gnorm, "tok_s": (tokens - tok_start) / elapsed, **m}
        write_line(line)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{m['loss']:.3f}",
                kl=",".join(f"{x:.3f}" for x in m["kl_teacher"]),
                tok_s=f"{line['tok_s']:.0f}",
            )
        if c.eval_every and step % c.eval_every == 0 and step < end:
            write_line({"eval": True, "step": step, "tokens": tokens, **run_eval()})
        if c.save_every and step % c.save_every == 0:
            save_state()
    if bar is not None:
        bar.close()
    save_state()
    final = run_eval()
    write_line({"eval": True, "step": step, "tokens": tokens, **final})
    log.close()

    out_cfg = copy.deepcopy(s_cfg)
    prov = out_cfg["provenance"]
    extra = prov.get("extra") or {}
    history = list(extra.get("training_history", []))
    recipe = {
        "tool": f"rrt-train {__version__} (torch {torch.__version__})",
        "objective": "KL(teacher || last loop) + %g * sum_b<B KL(sg(last loop) || loop b)%s"
        % (c.intermediate_weight, f" + {c.ce_weight} * CE(data)" if c.ce_weight else ""),
        "trainable": c.trainable,
        "steps": step,
        "tokens_seen": tokens,
        "batch": c.batch,
        "seq": c.seq,
        "lr": c.lr,
        "schedule": f"linear warm-up {c.warmup} steps, cosine to {c.min_lr_ratio} x lr"
        + (f" at step {c.steps}, stopped at {end}" if end < c.steps else ""),
        "optimizer": "AdamW(0.9, 0.95), weight decay %g, grad clip %g" % (c.weight_decay, c.grad_clip),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "teacher": str(c.teacher),
        "teacher_source_sha256": t_cfg["provenance"]["source_sha256"],
        "student": str(c.student),
        "data": str(c.data),
        "data_manifest_sha256": corpus.manifest_sha256,
        "heldout": final,
    }
    if c.exit_gate:
        recipe["exit_gate"] = {
            "objective": "sum_t p(t) sg(KL_t(teacher || loop t)) - %g H(p), p(t) = sigmoid(g_t) prod_{j<t} (1 - sigmoid(g_j)), "
            "g = exit_gate . h (loop output before the final norm); gate-only optimizer" % c.gate_beta,
            "beta": c.gate_beta,
            "lr": c.gate_lr or c.lr,
            "init": gate_from,
        }
    elif student.exit_gate is not None:
        recipe["exit_gate"] = {"init": "the student's", "trained": False}
    history.append(recipe)
    extra["training"] = recipe
    extra["training_history"] = history
    prov["extra"] = extra
    prov["tool"] = recipe["tool"]
    out_cfg["exit"] = {
        "criterion": None,
        "thresholds": [],
        "target_agreement": None,
        "calibration": {"note": "cleared by rrt-train: the loops changed; run `rrt calibrate`"},
    }
    ck.write(c.out, out_cfg, student.to_tensors(), c.student)
    return {"step": step, "tokens": tokens, "first_eval": first_eval, "final_eval": final, "out": str(c.out)}
