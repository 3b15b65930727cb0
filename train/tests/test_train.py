"""The objective and the training loop (CPU, tiny random models)."""

import copy
import json

import pytest
import torch

from rrt_train import checkpoint as ck
from rrt_train.data import Corpus, DataError, write_corpus
from rrt_train.loss import objective
from rrt_train.model import RecursiveLM, random_config, random_model
from rrt_train.trainer import TrainConfig, TrainError, lr_at, train


def test_objective_is_zero_at_the_teacher_and_detaches_the_final_loop():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 50, generator=g)
    same = [t.clone(), t.clone()]
    loss, m = objective(same, t, torch.randint(0, 50, (2, 5), generator=g))
    assert abs(loss.item()) < 1e-6 and m["agreement"] == [1.0, 1.0]
    # Final loop equal to the teacher, first loop different: the gradient reaches only loop 1
    # (the self-distillation target is detached), scaled by the 0.1 weight.
    z1 = torch.randn(2, 5, 50, generator=g, requires_grad=True)
    z2 = t.clone().requires_grad_(True)
    loss, m = objective([z1, z2], t, intermediate_weight=0.1)
    loss.backward()
    assert z2.grad.abs().max().item() < 1e-7
    assert z1.grad.abs().max().item() > 1e-4
    # Gradient of 0.1 * mean KL(p || softmax(z1)) w.r.t. z1 is 0.1 * (softmax(z1) - p) / rows.
    p = torch.softmax(t, -1)
    expect = 0.1 * (torch.softmax(z1.detach(), -1) - p) / 10
    assert torch.allclose(z1.grad, expect, atol=1e-7)
    # The teacher term: KL(t || z) with a different last loop moves the last loop.
    z3 = torch.randn(2, 5, 50, generator=g, requires_grad=True)
    objective([z1.detach(), z3], t)[0].backward()
    assert torch.allclose(z3.grad, (torch.softmax(z3.detach(), -1) - p) / 10, atol=1e-7)


def test_lr_schedule():
    c = TrainConfig("", "", "", "", steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(c, 0) == pytest.approx(1e-4)
    assert lr_at(c, 9) == pytest.approx(1e-3)
    assert lr_at(c, 10) == pytest.approx(1e-3)
    assert lr_at(c, 100) == pytest.approx(1e-4)
    assert all(lr_at(c, s) >= lr_at(c, s + 1) for s in range(10, 100))


def average_student(teacher: RecursiveLM, loops: int, rank: int) -> tuple[dict, dict]:
    """What `rrt convert --init average --lora-rank r` does: shared layer k is the mean of the
    teacher layers k, k + K, ...; LoRA of layer l is the rank-r SVD of its residual."""
    cfg = copy.deepcopy(teacher.cfg)
    layers = teacher.L
    k_shared = layers // loops
    cfg["recursion"] = {"loops": loops, "shared_layers": k_shared, "init": "average", "ranks": {m: rank for m in ck.MODULES}}
    t = teacher.to_tensors()
    out = {"embed": t["embed"], "norm": t["norm"]}
    for k in range(k_shared):
        for name in ("attn_norm", "ffn_norm", *ck.MODULES):
            out[f"shared.{k}.{name}"] = torch.stack([t[f"shared.{b * k_shared + k}.{name}"] for b in range(loops)]).mean(0)
    for li in range(layers):
        for m in ck.MODULES:
            res = (t[f"shared.{li}.{m}"] - out[f"shared.{li % k_shared}.{m}"]).double()
            u, s, vh = torch.linalg.svd(res, full_matrices=False)
            out[f"lora.{li}.{m}.b"] = (u[:, :rank] * s[:rank]).float()
            out[f"lora.{li}.{m}.a"] = vh[:rank].float()
    return cfg, out


@pytest.fixture()
def setup(tmp_path):
    tcfg = random_config(loops=1, layers=4, rank=0)
    tcfg["recursion"]["ranks"] = {m: 0 for m in ck.MODULES}
    teacher = random_model(tcfg, seed=11)
    ck.write(tmp_path / "teacher", tcfg, teacher.to_tensors(), None)
    scfg, st = average_student(teacher, loops=2, rank=4)
    ck.write(tmp_path / "student", scfg, st, None)
    g = torch.Generator().manual_seed(5)
    # Text the teacher writes itself, as `rrt distill-data` does: sampled continuations.
    docs = []
    with torch.no_grad():
        for _ in range(24):
            ids = torch.randint(0, 256, (1, 4), generator=g)
            for _ in range(44):
                z = teacher.loop_logits(ids)[-1][0, -1]
                nxt = torch.multinomial(torch.softmax(z, -1), 1, generator=g)
                ids = torch.cat([ids, nxt[None]], 1)
            docs.append(ids[0].tolist())
    write_corpus(tmp_path / "data", docs[:20], docs[20:], vocab=256)
    return tmp_path


def cfg_for(p, **kw):
    base = dict(
        student=str(p / "student"), teacher=str(p / "teacher"), data=str(p / "data"), out=str(p / "out"),
        steps=40, batch=4, seq=32, lr=3e-3, warmup=2, eval_every=20, eval_windows=4, save_every=10, progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def read_log(run):
    return [json.loads(line) for line in open(run / "log.jsonl")]


def test_training_lowers_every_loops_loss_and_writes_a_servable_checkpoint(setup):
    res = train(cfg_for(setup))
    log = read_log(setup / "out.run")
    steps = [x for x in log if not x.get("eval")]
    assert len(steps) == 40 and steps[-1]["tokens"] == 40 * 4 * 32
    first = sum(x["loss"] for x in steps[:5]) / 5
    last = sum(x["loss"] for x in steps[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    e0, e1 = res["first_eval"], res["final_eval"]
    # Held-out: both loops move towards the teacher, and loop 1 agrees more with loop 2.
    for b in range(2):
        assert e1["kl_teacher"][b] < 0.8 * e0["kl_teacher"][b], (b, e0, e1)
    assert e1["agreement"][0] >= e0["agreement"][0]
    assert len(steps[0]["kl_teacher"]) == 2 and len(steps[0]["self_kl"]) == 1 and len(steps[0]["ce"]) == 2
    cfg, tensors = ck.read(setup / "out")
    tr = cfg["provenance"]["extra"]["training"]
    assert tr["tokens_seen"] == 40 * 4 * 32 and tr["steps"] == 40 and tr["trainable"] == "all"
    assert "0.1 * sum_b<B KL(sg(last loop) || loop b)" in tr["objective"]
    assert cfg["exit"]["thresholds"] == [] and cfg["recursion"] == ck.read_config(setup / "student")["recursion"]
    # The written checkpoint computes what the trained model computed.
    assert tr["heldout"] == e1


def test_a_run_directory_is_never_overwritten_or_resumed_with_other_settings(setup):
    train(cfg_for(setup, steps=3, run=str(setup / "r")))
    with pytest.raises(TrainError, match="--resume"):
        train(cfg_for(setup, steps=6, run=str(setup / "r")))
    with pytest.raises(TrainError, match="batch was 4"):
        train(cfg_for(setup, steps=6, run=str(setup / "r"), batch=8, resume=True))
    res = train(cfg_for(setup, steps=6, run=str(setup / "r"), resume=True))
    assert res["step"] == 6 and res["tokens"] == 6 * 4 * 32


def test_resume_after_interruption_equals_an_uninterrupted_run(setup):
    # An interrupted run: state saved at step 10 (save_every), then killed; resuming it must
    # give bit-identical parameters to the run that was never interrupted.
    c = cfg_for(setup, steps=20, out=str(setup / "a"), run=str(setup / "ra"), save_every=10)
    train(c)
    full = ck.read(setup / "a")[1]
    c2 = cfg_for(setup, steps=20, out=str(setup / "b"), run=str(setup / "rb"), save_every=10)
    import rrt_train.trainer as tr

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = dying_step
    try:
        with pytest.raises(KeyboardInterrupt):
            tr.train(c2)
    finally:
        torch.optim.AdamW.step = real_step
    assert torch.load(setup / "rb" / "state.pt", weights_only=False)["step"] == 10
    c2.resume = True
    train(c2)
    resumed = ck.read(setup / "b")[1]
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    steps = [x["step"] for x in read_log(setup / "rb") if not x.get("eval")]
    assert steps[-10:] == list(range(11, 21))
    # --stop-at: the same schedule, stopped at step 14 (a checkpoint is written there), then
    # resumed to the end: again bit-identical.
    c3 = cfg_for(setup, steps=20, out=str(setup / "c"), run=str(setup / "rc"), save_every=10, stop_at=14)
    res = train(c3)
    assert res["step"] == 14
    recipe = ck.read(setup / "c")[0]["provenance"]["extra"]["training"]
    assert recipe["steps"] == 14 and recipe["schedule"].endswith("at step 20, stopped at 14")
    with pytest.raises(TrainError, match="--stop-at"):
        train(cfg_for(setup, steps=20, out=str(setup / "d"), run=str(setup / "rd"), stop_at=21))
    c3.stop_at, c3.resume = 0, True
    train(c3)
    resumed = ck.read(setup / "c")[1]
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_lora_only_leaves_the_shared_block_alone(setup):
    train(cfg_for(setup, steps=5, trainable="lora"))
    before = ck.read(setup / "student")[1]
    after = ck.read(setup / "out")[1]
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("lora."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("lora."))


def test_bad_inputs_are_refused_clearly(setup, tmp_path):
    with pytest.raises(TrainError, match="trainable"):
        train(cfg_for(setup, trainable="everything"))
    other = random_config(loops=1, layers=4, rank=0, vocab=300)
    other["recursion"]["ranks"] = {m: 0 for m in ck.MODULES}
    ck.write(tmp_path / "t300", other, random_model(other).to_tensors(), None)
    with pytest.raises(TrainError, match="vocabularies"):
        train(cfg_for(setup, teacher=str(tmp_path / "t300")))
    m = json.loads((setup / "data" / "manifest.json").read_text())
    m["model_sha256"] = "f" * 64
    (setup / "data" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TrainError, match="same original model"):
        train(cfg_for(setup))
    with pytest.raises(DataError, match="manifest"):
        Corpus(tmp_path / "nowhere")
    with pytest.raises(ck.CheckpointError, match="not found"):
        train(cfg_for(setup, student=str(tmp_path / "nowhere"), allow_mismatch=True))


def test_heldout_windows_are_fixed_and_disjoint_from_training_batches(tmp_path):
    write_corpus(tmp_path, [list(range(1, 200))], [list(range(200, 256)) * 3], vocab=256)
    c = Corpus(tmp_path)
    w = c.heldout_windows(16, 8)
    assert torch.equal(w, c.heldout_windows(16, 8))
    assert (w >= 200).all()
    b = c.batch(64, 16, torch.Generator().manual_seed(0))
    assert b.shape == (64, 17) and ((b < 200) | (b == 0)).all()
