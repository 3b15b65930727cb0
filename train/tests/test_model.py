"""The checkpoint format and the forward pass (CPU, tiny random models)."""

import copy
import json

import pytest
import torch

from rrt_train import checkpoint as ck
from rrt_train.model import RecursiveLM, random_config, random_model


def test_write_read_round_trip_is_exact(tmp_path):
    cfg = random_config(rank=4)
    m = random_model(cfg, seed=1)
    ck.write(tmp_path / "c", cfg, m.to_tensors(), None)
    m2 = RecursiveLM.from_checkpoint(tmp_path / "c")
    for k, v in m.to_tensors().items():
        assert torch.equal(v, m2.to_tensors()[k]), k
    ids = torch.randint(0, cfg["architecture"]["vocab"], (2, 9))
    for a, b in zip(m.loop_logits(ids), m2.loop_logits(ids)):
        assert torch.equal(a, b)


def test_broken_checkpoints_are_refused_with_the_tensor_named(tmp_path):
    cfg = random_config(rank=4)
    t = random_model(cfg).to_tensors()
    bad = dict(t)
    del bad["lora.3.up.b"]
    with pytest.raises(ck.CheckpointError, match="missing before write"):
        ck.write(tmp_path / "x", cfg, bad, None)
    ck.write(tmp_path / "c", cfg, t, None)
    from safetensors.torch import save_file

    t2 = dict(t)
    t2["shared.1.q"] = torch.zeros(3, 3)
    save_file(t2, str(tmp_path / "c" / ck.WEIGHTS_FILE))
    with pytest.raises(ck.CheckpointError, match="shared.1.q"):
        ck.read(tmp_path / "c")
    t2["shared.1.q"] = t["shared.1.q"].clone()
    t2["norm"] = t["norm"].clone()
    t2["norm"][3] = float("nan")
    save_file(t2, str(tmp_path / "c" / ck.WEIGHTS_FILE))
    with pytest.raises(ck.CheckpointError, match="NaN"):
        ck.read(tmp_path / "c")
    c = json.loads((tmp_path / "c" / ck.CONFIG_FILE).read_text())
    c["version"] = 7
    (tmp_path / "c" / ck.CONFIG_FILE).write_text(json.dumps(c))
    with pytest.raises(ck.CheckpointError, match="version 7"):
        ck.read(tmp_path / "c")
    c["version"] = 1
    c["weights"] = "q4_1"
    (tmp_path / "c" / ck.CONFIG_FILE).write_text(json.dumps(c))
    with pytest.raises(ck.CheckpointError, match="q4_1 blocks.*--quant f32"):
        ck.read(tmp_path / "c")


def unrolled_equivalent(m: RecursiveLM) -> RecursiveLM:
    """The same function as a plain L-layer model (B = 1, rank 0): each unrolled layer's
    shared weights with its LoRA merged in (W'_{l mod K} + B_l A_l)."""
    cfg = copy.deepcopy(m.cfg)
    cfg["recursion"] = {"loops": 1, "shared_layers": m.L, "init": "average", "ranks": {k: 0 for k in ck.MODULES}}
    u = RecursiveLM(cfg)
    t = m.to_tensors()
    out = {"embed": t["embed"], "norm": t["norm"]}
    for li in range(m.L):
        k = li % m.K
        out[f"shared.{li}.attn_norm"] = t[f"shared.{k}.attn_norm"]
        out[f"shared.{li}.ffn_norm"] = t[f"shared.{k}.ffn_norm"]
        for mod in ck.MODULES:
            w = t[f"shared.{k}.{mod}"].double()
            if f"lora.{li}.{mod}.a" in t:
                w = w + t[f"lora.{li}.{mod}.b"].double() @ t[f"lora.{li}.{mod}.a"].double()
            out[f"shared.{li}.{mod}"] = w.float()
    u.load_tensors(out)
    return u


@pytest.mark.parametrize("loops,layers", [(2, 4), (3, 6), (4, 4)])
def test_loops_equal_the_unrolled_model_with_merged_loras(loops, layers):
    cfg = random_config(loops=loops, layers=layers, rank=6)
    m = random_model(cfg, seed=loops)
    u = unrolled_equivalent(m)
    ids = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = m.loop_logits(ids)[-1]
        zu = u.loop_logits(ids)[-1]
        # The hidden state after loop b is the unrolled model's after layer (b + 1) K.
        hs = m.forward(ids)
        x = torch.nn.functional.embedding(ids, u.embed)
        cos, sin = u._rope(17, ids.device, x.dtype)
        for li in range(layers):
            x = u.layer(li, x, cos, sin)
            if (li + 1) % m.K == 0:
                assert torch.allclose(hs[(li + 1) // m.K - 1], x, atol=1e-4, rtol=1e-4)
    assert len(m.loop_logits(ids)) == loops
    assert torch.allclose(z, zu, atol=1e-4, rtol=1e-4)


def test_causality_and_rope_relative_positions():
    cfg = random_config(rank=4)
    m = random_model(cfg, seed=3)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m.loop_logits(ids)
        prefix = m.loop_logits(ids[:, :7])
    for a, b in zip(full, prefix):
        assert torch.allclose(a[:, :7], b, atol=1e-5)
    # Changing a later token leaves earlier positions alone.
    ids2 = ids.clone()
    ids2[0, 9] = (ids2[0, 9] + 1) % 256
    with torch.no_grad():
        z2 = m.loop_logits(ids2)[-1]
    assert torch.allclose(z2[:, :9], full[-1][:, :9], atol=1e-5)
    assert not torch.allclose(z2[:, 9:], full[-1][:, 9:])


def test_rope_scalings_match_the_rust_formulas():
    from rrt_train.model import inv_frequencies

    base = {"rope_dim": 8, "rope_theta": 10000.0}
    inv, s = inv_frequencies({**base, "rope_scaling": {"type": "none"}})
    assert s == 1.0 and torch.allclose(inv, torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64))
    _, s = inv_frequencies({**base, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert s == 0.25
    inv2, _ = inv_frequencies({**base, "rope_scaling": {"type": "factors", "factors": [1, 2, 4, 8]}})
    assert torch.allclose(inv2, inv / torch.tensor([1, 2, 4, 8], dtype=torch.float64))
    l3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position": 8192}
    inv3, _ = inv_frequencies({**base, "rope_scaling": l3})
    assert inv3[0] == inv[0]  # high frequency: unchanged
    # wavelength 2 pi / 0.001 = 6283 lies between 8192 / 4 and 8192: smoothly interpolated.
    import math

    f = 0.001
    smooth = (8192 / (2 * math.pi / f) - 1.0) / (4.0 - 1.0)
    assert abs(inv3[3] - ((1 - smooth) * f / 8.0 + smooth * f)) < 1e-15
    inv4, _ = inv_frequencies({"rope_dim": 16, "rope_theta": 1e6, "rope_scaling": l3})
    assert abs(inv4[7] - 1e6 ** (-14 / 16) / 8.0) < 1e-18  # wavelength > 8192: divided by the factor
    with pytest.raises(ck.CheckpointError):
        inv_frequencies({**base, "rope_scaling": {"type": "yarn"}})


def test_exit_gate_round_trips_and_is_checked(tmp_path):
    cfg = random_config(rank=4)
    m = random_model(cfg, seed=2)
    assert m.exit_gate is None and "exit_gate" not in cfg
    m.add_exit_gate(-2.0)
    assert cfg["exit_gate"] is True
    with torch.no_grad():
        m.exit_gate.weight.copy_(torch.randn(1, 64, generator=torch.Generator().manual_seed(4)))
        m.exit_gate.bias.fill_(0.25)
    ck.write(tmp_path / "g", cfg, m.to_tensors(), None)
    assert json.loads((tmp_path / "g" / ck.CONFIG_FILE).read_text())["exit_gate"] is True
    m2 = RecursiveLM.from_checkpoint(tmp_path / "g")
    assert torch.equal(m2.exit_gate.weight, m.exit_gate.weight) and m2.exit_gate.bias.item() == 0.25
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = m2.forward(ids)
        g = m2.gate_logits(hs)
        # g = w . h + b on the loop output before the final norm.
        assert len(g) == 2 and g[0].shape == (2, 9)
        assert torch.allclose(g[1], (hs[1].double() @ m.exit_gate.weight.double().t()).squeeze(-1).float() + 0.25, atol=1e-5)
    # Missing or misshapen gate tensors are refused by name; a bad flag too.
    t = m.to_tensors()
    bad = dict(t)
    del bad["exit_gate.bias"]
    with pytest.raises(ck.CheckpointError, match="exit_gate.bias"):
        ck.write(tmp_path / "x", cfg, bad, None)
    from safetensors.torch import save_file

    bad = dict(t)
    bad["exit_gate.weight"] = torch.zeros(64)
    save_file(bad, str(tmp_path / "g" / ck.WEIGHTS_FILE))
    with pytest.raises(ck.CheckpointError, match="exit_gate.weight"):
        ck.read(tmp_path / "g")
    c = json.loads((tmp_path / "g" / ck.CONFIG_FILE).read_text())
    c["exit_gate"] = "yes"
    (tmp_path / "g" / ck.CONFIG_FILE).write_text(json.dumps(c))
    with pytest.raises(ck.CheckpointError, match="exit_gate must be"):
        ck.read(tmp_path / "g")
    # Without the flag the gate is not part of the model (a checkpoint as before).
    del c["exit_gate"]
    (tmp_path / "g" / ck.CONFIG_FILE).write_text(json.dumps(c))
    save_file(t, str(tmp_path / "g" / ck.WEIGHTS_FILE))
    assert RecursiveLM.from_checkpoint(tmp_path / "g").exit_gate is None
