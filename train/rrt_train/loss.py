"""The uptraining objective (Bae et al., relaxed recursive transformers; early-exit training).

For loop outputs z_1 .. z_B of the student and logits t of the original model:

    L = KL(p_t || p_B) + w * sum_{b < B} KL(sg(p_B) || p_b)

forward KL from the teacher on the last loop (weight 1.0), and for every intermediate loop a
self-distillation term towards the *detached* final-loop distribution (weight w = 0.1 each), so
the early exits learn to agree with the full depth without pulling the last loop towards them.
Everything is computed in f32 whatever the activation dtype. Metrics (no gradient): every
loop's KL from the teacher, next-token cross-entropy on the data, agreement with the last loop.

The learned exit gate (optional; Ouro's stage I objective) is trained by `gate_objective`: per
token, with `lambda_t = sigmoid(g_t)` for loops t = 1 .. B-1,

    p(t) = lambda_t * prod_{j<t} (1 - lambda_j)   (t < B),   p(B) = prod_{j<B} (1 - lambda_j)
    L_gate = sum_t p(t) * sg(L_t) - beta * H(p)

where L_t is the token's KL from the teacher at loop t (detached: the gate learns where to exit,
it does not change what the loops learn) and H the entropy of the exit distribution, which keeps
the gate from collapsing onto one loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_tokens(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of every row `[...]` from log-probabilities `[..., V]`."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || q) from log-probabilities `[..., V]`."""
    return kl_tokens(p_logp, q_logp).mean()


def exit_distribution(gates: list[torch.Tensor]) -> torch.Tensor:
    """log p(t) `[..., B]` of exiting after loop t from the gate logits of loops 1 .. B-1 (the
    last loop takes the remaining probability); `gates[t]`: `[...]`. In log space, so a gate
    whose sigmoid rounds to 0 or 1 stays finite."""
    log_exit = [F.logsigmoid(g.float()) for g in gates]
    log_stay = [F.logsigmoid(-g.float()) for g in gates]
    survive = torch.zeros_like(log_exit[0])
    out = []
    for le, ls in zip(log_exit, log_stay):
        out.append(survive + le)
        survive = survive + ls
    out.append(survive)
    return torch.stack(out, -1)


def gate_objective(gates: list[torch.Tensor], token_losses: list[torch.Tensor], beta: float = 0.05) -> tuple[torch.Tensor, dict]:
    """The exit gate's loss (see the module doc), averaged over tokens. `gates`: the gate logits
    `[N, T]` of loops 1 .. B-1 (a gate read after the last loop is ignored); `token_losses`: every
    loop's per-token loss `[N, T]` (B of them; detached here)."""
    loops = len(token_losses)
    if loops < 2:
        raise ValueError("an exit gate needs at least 2 loops")
    log_p = exit_distribution(gates[: loops - 1])
    p = log_p.exp()
    losses = torch.stack([x.detach().float() for x in token_losses], -1)
    entropy = -(p * log_p).sum(-1)
    expected = (p * losses).sum(-1)
    loss = (expected - beta * entropy).mean()
    with torch.no_grad():
        metrics = {
            "gate_loss": loss.item(),
            "gate_expected_kl": expected.mean().item(),
            "gate_entropy": entropy.mean().item(),
            "exit_prob": p.flatten(0, -2).mean(0).tolist(),
            "expected_exit_loop": (p * torch.arange(1, loops + 1, device=p.device, dtype=p.dtype)).sum(-1).mean().item(),
        }
    return loss, metrics


def objective(
    student: list[torch.Tensor],
    teacher: torch.Tensor,
    targets: torch.Tensor | None = None,
    intermediate_weight: float = 0.1,
    ce_weight: float = 0.0,
    token_kl: list | None = None,
) -> tuple[torch.Tensor, dict]:
    """`student`: per-loop logits `[N, T, V]` (last = final loop); `teacher`: `[N, T, V]`;
    `targets`: next tokens `[N, T]` (metrics, and the optional data term `ce_weight`);
    `token_kl`: a list that receives every loop's per-token KL from the teacher `[N, T]`
    (detached; what the exit gate is trained on)."""
    t_logp = F.log_softmax(teacher.float(), -1)
    s_logp = [F.log_softmax(z.float(), -1) for z in student]
    last = s_logp[-1]
    loss_last = kl(t_logp, last)
    final = last.detach()
    self_terms = [kl(final, lp) for lp in s_logp[:-1]]
    loss = loss_last + intermediate_weight * sum(self_terms, torch.zeros((), device=loss_last.device))
    ce = None
    if targets is not None:
        ce = [F.nll_loss(lp.flatten(0, -2), targets.flatten()) for lp in s_logp]
        if ce_weight:
            loss = loss + ce_weight * ce[-1]
    with torch.no_grad():
        top_last = last.argmax(-1)
        per_token = [kl_tokens(t_logp, lp) for lp in s_logp]
        if token_kl is not None:
            token_kl.extend(per_token)
        metrics = {
            "loss": loss.item(),
            "kl_teacher": [x.mean().item() for x in per_token],
            "self_kl": [x.item() for x in self_terms],
            "agreement": [(lp.argmax(-1) == top_last).float().mean().item() for lp in s_logp],
        }
        if ce is not None:
            metrics["ce"] = [x.item() for x in ce]
            metrics["teacher_ce"] = F.nll_loss(t_logp.flatten(0, -2), targets.flatten()).item()
    return loss, metrics
