"""The causal LM loss: from the logits, or fused with the LM head so the [N, V] logits never exist whole.

N = B*S tokens, H hidden, V vocabulary. Both are the mean next-token cross-entropy in fp32 over the targets not
ignored: logits[:, t] predicts labels[:, t+1] (the labels are shifted, never the logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _shifted(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """labels [B, S] -> targets [B*S]: position t's target is labels[:, t+1]; the last position is ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1)


def _keep_graph() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True when torch cannot say."""
    get = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if get is None else bool(get())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits [B, S, V], labels [B, S] -> the mean next-token cross-entropy (fp32)."""
    return _CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), _shifted(labels, ignore_index), ignore_index)


class _CrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), target, ignore_index=...) whose backward turns the saved log-probabilities
    into the gradient in place (softmax - one-hot, scaled), instead of allocating two more [N, V] tensors as
    autograd's log_softmax + nll_loss do (no double backward). logits [N, V], target [N]."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index):
        logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V] fp32
        valid = target != ignore_index  # [N]
        index = target.masked_fill(~valid, 0)[:, None]  # [N, 1]
        count = valid.sum()
        ctx.save_for_backward(logp, index, valid, count)
        ctx.dtype = logits.dtype
        return -(logp.gather(1, index).squeeze(1) * valid).sum() / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logp, index, valid, count = ctx.saved_tensors
        g = (logp.clone() if _keep_graph() else logp).exp_()  # [N, V] softmax
        g.scatter_add_(1, index, -valid[:, None].to(g.dtype))  # - one-hot of each counted target
        g.mul_((valid * (grad / count))[:, None])  # ignored rows get 0
        return g.to(ctx.dtype), None, None


def head_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits computed at once by `causal_lm_head_loss`: on a CPU about 4M values (16 MB in fp32, which
    stays in cache through the softmax and its gradient); on a GPU about 32M values, large GEMMs."""
    return max(1, (2**25 if device.type == "cuda" else 2**22) // vocab)


def causal_lm_head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                        chunk_rows: int | None = None) -> torch.Tensor:
    """= causal_lm_loss(h @ weight.T, labels) without ever holding the [N, V] logits: h [B, S, H], weight [V, H]
    (the LM head), labels [B, S].

    The logits are made `chunk_rows` tokens at a time (default `head_chunk_rows`); when a gradient is wanted, each
    chunk's gradient (softmax - one-hot) is turned into the gradients of h and of the weight right away, and the
    backward only scales them. Memory: one chunk of logits instead of two or three [N, V] tensors; time: the same
    GEMMs, the softmax passes in cache."""
    H = h.shape[-1]
    rows = chunk_rows or head_chunk_rows(weight.shape[0], h.device)
    return _LinearCrossEntropy.apply(h.reshape(-1, H), weight, _shifted(labels, ignore_index), ignore_index, rows,
                                     torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    """h [N, H], weight [V, H], target [N] -> mean cross-entropy of h @ weight.T (fp32), gradients made in the
    forward, chunk by chunk (no double backward). `grad`: whether grad mode was on at the call (needs_input_grad
    follows requires_grad only, so under no_grad it alone would still make the gradients)."""

    @staticmethod
    def forward(ctx, h, weight, target, ignore_index, rows, grad):
        N = h.shape[0]
        valid = target != ignore_index  # [N]
        index = target.masked_fill(~valid, 0)[:, None]  # [N, 1]
        count = valid.sum()
        want_h, want_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        g_h = torch.empty_like(h) if want_h else None  # [N, H]
        g_w = None  # [V, H] fp32, made by the first chunk
        scale = (valid / count)[:, None]  # [N, 1] d loss / d (each row's cross-entropy)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, N, rows):
            hc, ic, vc = h[s:s + rows], index[s:s + rows], valid[s:s + rows]
            z = (hc @ weight.T).float()  # [n, V] fp32 logits of this chunk
            picked = z.gather(1, ic).squeeze(1)  # [n]
            top = z.amax(dim=-1, keepdim=True)  # [n, 1]
            e = z.sub_(top).exp_()  # [n, V] exp(z - max), in place
            sum_e = e.sum(dim=-1, keepdim=True)  # [n, 1]
            total += ((top + sum_e.log()).squeeze(1).sub_(picked) * vc).sum()  # log-sum-exp - target logit
            if not (want_h or want_w):
                continue
            sc = scale[s:s + rows]
            g = e.mul_(sc / sum_e)  # [n, V] softmax, scaled
            g.scatter_add_(1, ic, -sc)  # - one-hot of each counted target, scaled
            g = g.to(h.dtype)  # d loss / d logits
            if want_h:
                torch.mm(g, weight, out=g_h[s:s + rows])  # [n, H]
            if want_w:
                if g_w is None:
                    g_w = (g.T @ hc).float()  # [V, H]
                elif g_w.dtype == g.dtype:
                    g_w.addmm_(g.T, hc)
                else:
                    g_w += g.T @ hc  # summed in fp32
        ctx.save_for_backward(g_h, g_w)
        ctx.dtype = weight.dtype
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        g_h, g_w = ctx.saved_tensors
        keep = _keep_graph()
        if g_h is not None:
            g_h = g_h * grad if keep else g_h.mul_(grad)
        if g_w is not None:
            g_w = (g_w * grad if keep else g_w.mul_(grad)).to(ctx.dtype)
        return g_h, g_w, None, None, None, None
