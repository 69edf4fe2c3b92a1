"""llama.loss: the causal LM loss from logits against F.cross_entropy, and the loss fused with the LM head
(chunked, gradients made in the forward) against it: values and gradients, ignored targets, chunks that do not
divide the tokens, a single token, bf16, no-grad, and gradients wanted for only one input."""

import pytest
import torch
import torch.nn.functional as F

from moekit.llama.loss import causal_lm_head_loss, causal_lm_loss, head_chunk_rows


def _reference(h, w, labels):
    logits = (h @ w.T).float()
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), target.reshape(-1), ignore_index=-100)


def _case(B=3, S=37, H=24, V=101, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[-1, 5:12] = -100  # a padded stretch (none when S <= 5)
    return h, w, labels


def _grads(loss_fn, h, w, labels):
    h.grad = w.grad = None
    loss = loss_fn(h, w, labels)
    (loss * 1.7).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad.clone(), w.grad.clone()


def test_loss_from_logits_matches_cross_entropy():
    h, w, labels = _case()
    want = _grads(_reference, h, w, labels)
    got = _grads(lambda h, w, y: causal_lm_loss(h @ w.T, y), h, w, labels)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 7, 16, 111, 1000], ids=lambda r: f"rows{r}")
def test_fused_head_loss_matches_the_logits_path(rows):
    h, w, labels = _case()  # N = 111 tokens: chunks of 7 and 16 leave a remainder
    want = _grads(_reference, h, w, labels)
    got = _grads(lambda h, w, y: causal_lm_head_loss(h, w, y, chunk_rows=rows), h, w, labels)
    assert abs(got[0].item() - want[0].item()) <= 1e-5
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
    assert got[1][-1, 4:11].abs().max() == 0  # positions whose target is ignored get no gradient


def test_fused_head_loss_on_two_tokens_and_all_ignored():
    h, w, labels = _case(B=1, S=2)
    want, got = _grads(_reference, h, w, labels), _grads(causal_lm_head_loss, h, w, labels)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ignored = torch.full_like(labels, -100)
    assert torch.isnan(causal_lm_head_loss(h, w, ignored)) and torch.isnan(causal_lm_loss(h @ w.T, ignored))


def test_fused_head_loss_in_bf16_sums_the_weight_gradient_in_fp32():
    h, w, labels = _case(S=200, dtype=torch.bfloat16)
    want = _grads(_reference, h, w, labels)
    got = _grads(lambda h, w, y: causal_lm_head_loss(h, w, y, chunk_rows=32), h, w, labels)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert abs(got[0].item() - want[0].item()) <= 1e-3
    torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(got[2], want[2], rtol=2e-2, atol=1e-4)


def test_fused_head_loss_without_grad_and_with_one_input_wanting_it():
    h, w, labels = _case()
    want = _reference(h, w, labels).item()
    with torch.no_grad():
        assert abs(causal_lm_head_loss(h, w, labels, chunk_rows=10).item() - want) <= 1e-5
    frozen = w.detach()  # only h wants a gradient (a frozen LM head)
    h.grad = None
    causal_lm_head_loss(h, frozen, labels, chunk_rows=10).backward()
    ref_h = h.detach().clone().requires_grad_()
    _reference(ref_h, frozen, labels).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-6)


def test_fused_head_loss_backward_twice_with_retain_graph():
    h, w, labels = _case()
    loss = causal_lm_head_loss(h, w, labels, chunk_rows=20)
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * first)


def test_chunk_rows_follow_the_vocabulary():
    assert head_chunk_rows(8192, torch.device("cpu")) == 512
    assert head_chunk_rows(128256, torch.device("cpu")) == 32
    assert head_chunk_rows(2**30, torch.device("cpu")) == 1
    assert head_chunk_rows(128256, torch.device("cuda")) == 261


def test_fused_head_loss_makes_no_gradients_under_no_grad(monkeypatch):
    h, w, labels = _case()
    products = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: products.append(1) or mm(*a, **k))
    with torch.no_grad():
        causal_lm_head_loss(h, w, labels, chunk_rows=10)
    assert products == []  # only the logits (`@`), no gradient products
    causal_lm_head_loss(h, w, labels, chunk_rows=10)
    assert len(products) == 12  # with grad: d h per chunk (111 tokens in chunks of 10)
