#!/usr/bin/env python3
"""The uptraining pipeline end to end, and the QUALITY.md "after uptraining" row it yields.

    python3 scripts/uptrain.py --loops 2 --rank 64 --steps 300 [--stop-at 150 --batch 4 --seq 256]
        [--lr 2e-4 --device auto --python .venv-train/bin/python --tag cpu]

1. the original as a B = 1 checkpoint (teacher), the corpus (`rrt distill-data`) and the
   converted student (average init, activation-aware SVD on data/calibration.txt), each made
   once and reused;
2. training (`python -m rrt_train train`, resumable: rerunning continues the run);
3. on held-out text (the last 100,000 bytes of tinyshakespeare, inside the corpus's held-out
   split, which training never reads: 40 kB for exit calibration, 60 kB for perplexity):
   perplexity and per-loop agreement of the original, the student before and after training
   (`rrt eval`), mean loops per token at thresholds calibrated for agreement 0.9 and 0.95
   (`rrt calibrate --dry-run`: max-prob, the trained gate with --exit-gate, and a gate fitted to
   the calibration text), then the trained checkpoint is calibrated at 0.95 for serving (on
   the fitted gate with --fit-gate).

Writes `bench-out/uptrain/<name>.json` and prints the markdown row.
"""
import argparse
import json
import os
import subprocess
import sys
import time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--loops", type=int, default=2)
ap.add_argument("--rank", type=int, default=64)
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--lr", type=float, default=2e-4)
ap.add_argument("--stop-at", type=int, default=0, help="stop after this step; the schedule stays laid out for --steps")
ap.add_argument("--warmup", type=int, default=10)
ap.add_argument("--trainable", default="all")
ap.add_argument("--device", default="auto")
ap.add_argument("--eval-every", type=int, default=50)
ap.add_argument("--tag", default="")
ap.add_argument("--samples", type=int, default=512, help="generated samples in the corpus")
ap.add_argument("--python", default=os.path.join(root, ".venv-train", "bin", "python"))
ap.add_argument("--rrt", default=os.environ.get("RRT_BIN", os.path.join(root, "target", "release", "rrt")))
ap.add_argument("--windows", default="16")
ap.add_argument("--exit-gate", action="store_true",
                help="train the learned exit gate too; the trained model is then calibrated on it (--criterion gate)")
ap.add_argument("--fit-gate", action="store_true",
                help="serve on a gate fitted to the calibration text (`rrt calibrate --fit-gate`), replacing a trained one")
a = ap.parse_args()

models = os.path.join(root, "models")
out_dir = os.path.join(root, "bench-out", "uptrain")
os.makedirs(out_dir, exist_ok=True)
teacher = os.path.join(models, "SmolLM2-135M-Instruct-teacher-b1")
data = os.path.join(models, "distill-SmolLM2-135M-Instruct")
student = os.path.join(models, f"SmolLM2-135M-Instruct-rrt-b{a.loops}-average-r{a.rank}-activation")
name = f"b{a.loops}-r{a.rank}-{a.trainable}" + ("-gate" if a.exit_gate else "") + (f"-{a.tag}" if a.tag else "")
trained = os.path.join(models, f"SmolLM2-135M-Instruct-rrt-b{a.loops}-r{a.rank}-uptrained-{name}")


def run(cmd, capture=True):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, cwd=root, capture_output=capture, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr if capture else ''}")
    return r.stdout if capture else ""


def rrt(*args, capture=True):
    return run([a.rrt, *args], capture)


if not os.path.exists(os.path.join(teacher, "rrt_checkpoint.json")):
    rrt("convert", "--out", teacher, "--loops", "1")
if not os.path.exists(os.path.join(data, "manifest.json")):
    rrt("distill-data", "--out", data, "--samples", str(a.samples), capture=False)
if not os.path.exists(os.path.join(student, "rrt_checkpoint.json")):
    rrt("convert", "--out", student, "--loops", str(a.loops), "--lora-rank", str(a.rank),
        "--svd", "activation", "--calibration", "data/calibration.txt")

# Held-out texts, cut at line ends.
raw = open(os.path.join(root, "..", "shared", "data", "tinyshakespeare.txt"), "rb").read()[-100000:]
raw = raw[raw.index(b"\n") + 1:]
cut = raw.index(b"\n", 40000) + 1
calib, evalt = os.path.join(out_dir, "heldout-calib.txt"), os.path.join(out_dir, "heldout-eval.txt")
open(calib, "wb").write(raw[:cut])
open(evalt, "wb").write(raw[cut:])

t0 = time.time()
train_cmd = [a.python, "-m", "rrt_train", "train", "--student", student, "--teacher", teacher, "--data", data,
             "--out", trained, "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq),
             "--lr", str(a.lr), "--stop-at", str(a.stop_at), "--warmup", str(a.warmup), "--trainable", a.trainable, "--device", a.device,
             "--eval-every", str(a.eval_every)] + (["--exit-gate"] if a.exit_gate else [])
if os.path.exists(os.path.join(trained + ".run", "state.pt")):
    train_cmd.append("--resume")
env = dict(os.environ, PYTHONPATH=os.path.join(root, "train"))
print("+", " ".join(train_cmd), file=sys.stderr, flush=True)
if subprocess.run(train_cmd, cwd=root, env=env).returncode != 0:
    sys.exit("training failed")
train_s = time.time() - t0
log = [json.loads(x) for x in open(trained + ".run/log.jsonl")]
steps = [x for x in log if not x.get("eval")]
evals = [x for x in log if x.get("eval")]


def evaluate(model):
    args = ["eval", "--text", evalt, "--windows", a.windows, "--json"] + (["--model", model] if model else [])
    return json.loads(rrt(*args))


def mean_loops(model, criterion="max-prob"):
    how = ["--fit-gate"] if criterion == "fitted-gate" else ["--criterion", criterion]
    out = rrt("calibrate", "--model", model, *how, "--text", calib, "--agreement", "0.9", "--also-agreement", "0.95",
              "--dry-run", "--json", "--tokens", "4096")
    return [json.loads(line)["mean_loops"] for line in out.splitlines() if line.strip()]


res = {
    "name": name, "loops": a.loops, "rank": a.rank, "trainable": a.trainable,
    "steps": steps[-1]["step"] if steps else 0, "tokens_seen": steps[-1]["tokens"] if steps else 0,
    "train_seconds_this_call": train_s,
    "tok_s": sum(x["tok_s"] for x in steps[-10:]) / max(len(steps[-10:]), 1),
    "device": json.load(open(os.path.join(trained, "rrt_checkpoint.json")))["provenance"]["extra"]["training"]["device"],
    "original": evaluate(None),
    "before": evaluate(student), "before_mean_loops": mean_loops(student),
    "after": evaluate(trained), "after_mean_loops": mean_loops(trained),
    "after_gate_mean_loops": mean_loops(trained, "gate") if a.exit_gate else None,
    "after_fitted_gate_mean_loops": mean_loops(trained, "fitted-gate"),
    "first_steps": steps[:5], "last_steps": steps[-5:], "evals": evals,
}
rrt("calibrate", "--model", trained, "--text", calib, "--agreement", "0.95",
    *(["--fit-gate"] if a.fit_gate else ["--criterion", "gate" if a.exit_gate else "max-prob"]))
json.dump(res, open(os.path.join(out_dir, name + ".json"), "w"), indent=1)
ag = lambda e: ", ".join(f"{x['agreement']:.3f}" for x in e["loops"][:-1])
print(f"| {a.loops} | {a.rank} | {a.trainable} | {res['tokens_seen']:,} ({res['device']}) | {res['original']['ppl']:.1f} | "
      f"{res['before']['ppl']:.1f} | {res['after']['ppl']:.1f} | {ag(res['before'])} | {ag(res['after'])} | "
      f"{res['before_mean_loops'][0]:.2f} / {res['before_mean_loops'][1]:.2f} | {res['after_mean_loops'][0]:.2f} / {res['after_mean_loops'][1]:.2f} |")
