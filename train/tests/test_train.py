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
    return make_setup(tmp_path)


def make_setup(tmp_path):
    """A teacher (B = 1, 4 layers), its average-init student (B = 2, rank 4) and a corpus the
    teacher sampled, in `tmp_path`."""
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


# ---- the learned exit gate ---------------------------------------------------------------


def test_gate_objective_is_ouros_exit_distribution_with_detached_losses():
    from rrt_train.loss import exit_distribution, gate_objective

    g = torch.Generator().manual_seed(3)
    gates = [torch.randn(2, 5, generator=g, requires_grad=True) for _ in range(2)]  # B = 3
    losses = [torch.rand(2, 5, generator=g, requires_grad=True) for _ in range(3)]
    lam = [torch.sigmoid(x.detach()) for x in gates]
    p = torch.stack([lam[0], lam[1] * (1 - lam[0]), (1 - lam[0]) * (1 - lam[1])], -1)
    assert torch.allclose(exit_distribution(gates).exp(), p, atol=1e-6)
    beta = 0.05
    loss, m = gate_objective(gates, losses, beta)
    lt = torch.stack([x.detach() for x in losses], -1)
    expect = ((p * lt).sum(-1) + beta * (p * p.log()).sum(-1)).mean()
    assert abs(loss.item() - expect.item()) < 1e-6
    assert m["exit_prob"] == pytest.approx(p.flatten(0, 1).mean(0).tolist(), abs=1e-6)
    assert m["expected_exit_loop"] == pytest.approx((p * torch.tensor([1.0, 2.0, 3.0])).sum(-1).mean().item(), abs=1e-6)
    loss.backward()
    assert all(x.grad is None for x in losses), "the per-loop losses are detached"
    assert all(x.grad.abs().max() > 0 for x in gates)
    # A gate read after the last loop is ignored; a saturated gate stays finite.
    assert gate_objective(gates + [torch.zeros(2, 5)], losses, beta)[0].item() == pytest.approx(loss.item())
    big = [torch.full((1, 3), 80.0), torch.full((1, 3), -80.0)]
    sat, sm = gate_objective(big, [torch.ones(1, 3)] * 3, beta)
    assert torch.isfinite(sat) and sm["exit_prob"][0] == pytest.approx(1.0)


def test_gate_objective_teaches_a_gate_to_exit_where_the_early_loop_is_as_good():
    from rrt_train.loss import gate_objective
    from rrt_train.model import ExitGate

    # Synthetic loop outputs: loop 1's loss is below loop 2's exactly where h . u > 0.
    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 64, generator=g)
    u = torch.randn(64, generator=g)
    s = h @ u / 8
    losses = [1.0 - 0.5 * s, torch.ones(512)]
    gate = ExitGate(64, -2.0)
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    first = None
    for _ in range(200):
        loss, m = gate_objective([gate(h)], losses, 0.05)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    lam = torch.sigmoid(gate(h)).detach()
    assert loss.item() < first - 0.1, (first, loss.item())
    assert (lam[s > 0.5] > 0.9).float().mean() > 0.95 and (lam[s < -0.5] < 0.1).float().mean() > 0.95
    assert 0.3 < m["exit_prob"][0] < 0.7


def test_exit_gate_learns_and_leaves_the_model_updates_unchanged(setup):
    from rrt_train.loss import gate_objective, objective

    # Same seed, with and without the gate: every model tensor bit-identical after 5 steps.
    train(cfg_for(setup, steps=5, out=str(setup / "plain"), eval_every=0, save_every=0))
    train(cfg_for(setup, steps=5, out=str(setup / "gated5"), eval_every=0, save_every=0, exit_gate=True))
    plain, gated = ck.read(setup / "plain")[1], ck.read(setup / "gated5")[1]
    assert set(gated) - set(plain) == {"exit_gate.weight", "exit_gate.bias"}
    for k in plain:
        assert torch.equal(plain[k], gated[k]), k
    lp, lg = read_log(setup / "plain.run"), read_log(setup / "gated5.run")
    assert [x["loss"] for x in lp if not x.get("eval")] == [x["loss"] for x in lg if not x.get("eval")]

    res = train(cfg_for(setup, steps=40, exit_gate=True))
    steps = [x for x in read_log(setup / "out.run") if not x.get("eval")]
    for k in ("gate_loss", "gate_entropy", "exit_prob", "gate_grad_norm"):
        assert k in steps[0], k
    assert len(steps[0]["exit_prob"]) == 2 and steps[0]["exit_prob"][0] == pytest.approx(torch.sigmoid(torch.tensor(-2.0)).item(), abs=1e-3)
    first = sum(x["gate_loss"] for x in steps[:5]) / 5
    last = sum(x["gate_loss"] for x in steps[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    e0, e1 = res["first_eval"], res["final_eval"]
    assert e0["expected_exit_loop"] == pytest.approx(2 - 0.1192, abs=1e-3)
    # Exits are neither all rare nor all certain after training, and differ by token.
    assert 0.15 < e1["exit_prob"][0] < 0.85, e1
    assert e1["expected_exit_loop"] == pytest.approx(1 + e1["exit_prob"][1], abs=1e-5)
    cfg, tensors = ck.read(setup / "out")
    assert cfg["exit_gate"] is True and tuple(tensors["exit_gate.weight"].shape) == (1, 64)
    assert cfg["provenance"]["extra"]["training"]["exit_gate"]["init"].startswith("new")
    m = RecursiveLM.from_checkpoint(setup / "out")
    teacher = RecursiveLM.from_checkpoint(setup / "teacher")
    ids = Corpus(setup / "data").heldout_windows(32, 4)[:, :-1]
    with torch.no_grad():
        hidden = m.forward(ids)
        token_kl: list = []
        objective([m.head(h) for h in hidden], teacher.loop_logits(ids)[-1], token_kl=token_kl)
        trained, _ = gate_objective(m.gate_logits(hidden[:-1]), token_kl)
        lam = torch.sigmoid(m.gate_logits(hidden[:1])[0])
        # On held-out text and the trained loops, the trained gate beats the initial one
        # (weight 0, bias -2) and every constant gate: it reads the token's state.
        m.exit_gate.weight.zero_()
        m.exit_gate.bias.fill_(-2.0)
        initial, _ = gate_objective(m.gate_logits(hidden[:-1]), token_kl)
        const = min(gate_objective([torch.full_like(lam, b)], token_kl)[0].item() for b in torch.linspace(-5, 3, 81).tolist())
    assert trained.item() < const < initial.item(), (trained.item(), const, initial.item())
    assert lam.std() > 0.05, lam


def test_exit_gate_resumes_and_continues_from_a_gated_checkpoint(setup):
    # An interrupted gated run, resumed, equals the uninterrupted one bit for bit (the gate's
    # optimizer state included).
    train(cfg_for(setup, steps=12, out=str(setup / "a"), run=str(setup / "ra"), save_every=6, exit_gate=True))
    full = ck.read(setup / "a")[1]
    c = cfg_for(setup, steps=12, out=str(setup / "b"), run=str(setup / "rb"), save_every=6, exit_gate=True, stop_at=8)
    train(c)
    with pytest.raises(TrainError, match="exit_gate was True"):
        train(cfg_for(setup, steps=12, out=str(setup / "b"), run=str(setup / "rb"), save_every=6, resume=True))
    c.stop_at, c.resume = 0, True
    train(c)
    resumed = ck.read(setup / "b")[1]
    assert set(full) == set(resumed)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # Training a gated checkpoint again starts from its gate (the first evaluation is the
    # previous run's last), and without --exit-gate writes it back unchanged.
    prev = ck.read_config(setup / "a")["provenance"]["extra"]["training"]["heldout"]
    res = train(cfg_for(setup, student=str(setup / "a"), steps=2, out=str(setup / "c"), run=str(setup / "rc"), exit_gate=True))
    assert res["first_eval"]["exit_prob"] == prev["exit_prob"]
    assert ck.read_config(setup / "c")["provenance"]["extra"]["training"]["exit_gate"]["init"] == "the student's"
    train(cfg_for(setup, student=str(setup / "a"), steps=2, out=str(setup / "d"), run=str(setup / "rd")))
    d = ck.read(setup / "d")[1]
    assert torch.equal(d["exit_gate.weight"], full["exit_gate.weight"]) and torch.equal(d["exit_gate.bias"], full["exit_gate.bias"])
    assert not torch.equal(d["lora.0.q.a"], full["lora.0.q.a"])
    # One loop has nowhere to exit.
    with pytest.raises(TrainError, match="at least 2"):
        train(cfg_for(setup, student=str(setup / "teacher"), out=str(setup / "e"), run=str(setup / "re"), exit_gate=True))
