"""The uptraining objective (Bae et al., relaxed recursive transformers; early-exit training).

For loop outputs z_1 .. z_B of the student and logits t of the original model:

    L = KL(p_t || p_B) + w * sum_{b < B} KL(sg(p_B) || p_b)

forward KL from the teacher on the last loop (weight 1.0), and for every intermediate loop a
self-distillation term towards the *detached* final-loop distribution (weight w = 0.1 each), so
the early exits learn to agree with the full depth without pulling the last loop towards them.
Everything is computed in f32 whatever the activation dtype. Metrics (no gradient): every
loop's KL from the teacher, next-token cross-entropy on the data, agreement with the last loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || q) from log-probabilities `[..., V]`."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1).mean()


def objective(
    student: list[torch.Tensor],
    teacher: torch.Tensor,
    targets: torch.Tensor | None = None,
    intermediate_weight: float = 0.1,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """`student`: per-loop logits `[N, T, V]` (last = final loop); `teacher`: `[N, T, V]`;
    `targets`: next tokens `[N, T]` (metrics, and the optional data term `ce_weight`)."""
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
        metrics = {
            "loss": loss.item(),
            "kl_teacher": [kl(t_logp, lp).item() for lp in s_logp],
            "self_kl": [x.item() for x in self_terms],
            "agreement": [(lp.argmax(-1) == top_last).float().mean().item() for lp in s_logp],
        }
        if ce is not None:
            metrics["ce"] = [x.item() for x in ce]
            metrics["teacher_ce"] = F.nll_loss(t_logp.flatten(0, -2), targets.flatten()).item()
    return loss, metrics
