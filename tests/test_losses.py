"""Parity and gradient tests for vlmalign.losses: each loss against a reference
(open_clip, HF-style full-vocabulary CE, naive loops) and torch.autograd.gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmalign.losses import (
    clip_loss,
    gather_with_grad,
    linear_cross_entropy,
    next_token_loss,
    patch_token_contrastive_loss,
    patch_token_similarity,
    pool_visual_tokens,
    siglip_loss,
)


@pytest.fixture(scope="module")
def open_clip_loss():
    return pytest.importorskip("open_clip.loss")


def _unit(b: int, d: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(b, d, generator=gen, dtype=dtype), dim=-1)


# ----- CLIP / SigLIP ---------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_clip_loss_matches_open_clip(open_clip_loss, batch):
    gen = torch.Generator().manual_seed(batch)
    img, txt = _unit(batch, 16, gen), _unit(batch, 16, gen)
    scale = torch.tensor(1 / 0.07)
    ours = clip_loss(img, txt, scale)["clip_loss"]
    ref = open_clip_loss.ClipLoss()(img, txt, scale)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    # the loss depends on the pairing: matched near-duplicates score far below a mismatch
    if batch > 1:
        close = F.normalize(img + 0.1 * torch.randn(img.shape, generator=gen), dim=-1)
        matched = clip_loss(img, close, scale)["clip_loss"]
        shuffled = clip_loss(img, close.roll(1, dims=0), scale)["clip_loss"]
        assert matched.item() < 0.1 < shuffled.item()


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_siglip_loss_matches_open_clip(open_clip_loss, batch):
    gen = torch.Generator().manual_seed(100 + batch)
    img, txt = _unit(batch, 16, gen), _unit(batch, 16, gen)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = siglip_loss(img, txt, scale, bias)["siglip_loss"]
    ref = open_clip_loss.SigLipLoss()(img, txt, scale, bias)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)


def test_siglip_loss_formula_by_hand():
    gen = torch.Generator().manual_seed(7)
    img, txt = _unit(4, 8, gen, torch.float64), _unit(4, 8, gen, torch.float64)
    s, b = 3.0, -2.0
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            logit = torch.tensor(z * (s * float(img[i] @ txt[j]) + b), dtype=torch.float64)
            total += -F.logsigmoid(logit).item()
    ours = siglip_loss(img, txt, torch.tensor(s, dtype=torch.float64), b)["siglip_loss"]
    assert ours.item() == pytest.approx(total / 4, abs=1e-10)


def test_clip_and_siglip_reject_mismatched_batches():
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), 10.0)
    with pytest.raises(ValueError, match="same shape"):
        siglip_loss(torch.randn(3, 4), torch.randn(3, 5), 10.0, -10.0)


def test_clip_loss_gradcheck_including_logit_scale():
    gen = torch.Generator().manual_seed(1)
    img = _unit(3, 4, gen, torch.float64).requires_grad_()
    txt = _unit(3, 4, gen, torch.float64).requires_grad_()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, s: clip_loss(a, b, s)["clip_loss"], (img, txt, scale)
    )
    # gather=True without a process group is the same function
    assert torch.autograd.gradcheck(
        lambda a, b, s: clip_loss(a, b, s, gather=True)["clip_loss"], (img, txt, scale)
    )


def test_siglip_loss_gradcheck():
    gen = torch.Generator().manual_seed(2)
    img = _unit(3, 4, gen, torch.float64).requires_grad_()
    txt = _unit(3, 4, gen, torch.float64).requires_grad_()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, s, c: siglip_loss(a, b, s, c)["siglip_loss"], (img, txt, scale, bias)
    )


# ----- patch-token (CG-VLM) ----------------------------------------------------------------


def _patch_inputs(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    visual = torch.randn(3, 4, 5, generator=gen, dtype=dtype)  # [B, Q, D]
    text = torch.randn(3, 6, 5, generator=gen, dtype=dtype)  # [B, T, D]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    text[mask == 0] = 7.0  # padding content must not leak into the similarity
    return visual, text, mask


def _naive_similarity(visual, text, mask):
    b_img, q_len, _ = visual.shape
    b_txt, t_len, _ = text.shape
    sim = torch.zeros(b_img, b_txt, dtype=visual.dtype)
    for i in range(b_img):
        for j in range(b_txt):
            total, count = 0.0, 0
            for q in range(q_len):
                for t in range(t_len):
                    if mask[j, t]:
                        total = total + F.cosine_similarity(visual[i, q], text[j, t], dim=0)
                        count += 1
            sim[i, j] = total / count
    return sim


def test_patch_token_similarity_matches_quadruple_loop():
    visual, text, mask = _patch_inputs()
    ours = patch_token_similarity(visual, text, mask)
    ref = _naive_similarity(visual, text, mask)
    assert ours.shape == (3, 3)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


def test_patch_token_contrastive_loss_matches_naive():
    visual, text, mask = _patch_inputs(seed=3)
    tau = 0.07
    sim = _naive_similarity(visual, text, mask)
    labels = torch.arange(3)
    ref = (F.cross_entropy(sim / tau, labels) + F.cross_entropy(sim.T / tau, labels)) / 2
    ours = patch_token_contrastive_loss(visual, text, mask, tau)["patch_loss"]
    assert ours.item() == pytest.approx(ref.item(), abs=1e-10)
    assert patch_token_contrastive_loss(visual, text, mask, tau, gather=True)[
        "patch_loss"
    ].item() == pytest.approx(ref.item(), abs=1e-10)


def test_patch_token_empty_text_and_zero_vectors_stay_finite():
    visual, text, mask = _patch_inputs(seed=4)
    mask = mask.clone()
    mask[1] = 0  # a text with no valid token
    visual = visual.clone()
    visual[0, 0] = 0.0  # a zero-norm patch
    visual.requires_grad_()
    text.requires_grad_()
    sim = patch_token_similarity(visual, text, mask)
    assert torch.all(sim[:, 1] == 0)
    loss = patch_token_contrastive_loss(visual, text, mask, 0.1)["patch_loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(visual.grad).all() and torch.isfinite(text.grad).all()
    assert torch.all(text.grad[1] == 0)


def test_patch_token_contrastive_loss_gradcheck():
    visual, text, mask = _patch_inputs(seed=5)
    visual.requires_grad_()
    text.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, e: patch_token_contrastive_loss(v, e, mask, 0.2)["patch_loss"], (visual, text)
    )


def test_patch_token_rejects_bad_mask():
    visual, text, mask = _patch_inputs()
    with pytest.raises(ValueError, match="text_mask"):
        patch_token_similarity(visual, text, mask[:, :4])


# ----- pooling ---------------------------------------------------------------------------


def test_pool_visual_tokens_4x4_to_2x2():
    visual = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # [B, 16, D]
    pooled = pool_visual_tokens(visual, (4, 4), 2)
    assert pooled.shape == (2, 4, 3)
    grid = visual.reshape(2, 4, 4, 3)  # row-major [B, h, w, D]
    for r in range(2):
        for c in range(2):
            manual = grid[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(dim=(1, 2))
            torch.testing.assert_close(pooled[:, 2 * r + c], manual)


def test_pool_visual_tokens_identity_and_errors():
    visual = torch.randn(2, 9, 4)
    assert pool_visual_tokens(visual, (3, 3), 3) is visual
    with pytest.raises(ValueError, match="h\\*w"):
        pool_visual_tokens(visual, (4, 4), 2)
    with pytest.raises(ValueError, match="smaller pool"):
        pool_visual_tokens(visual, (3, 3), 4)


# ----- next-token ------------------------------------------------------------------------


def _hf_reference(hidden, labels, weight, bias=None, cap=None):
    logits = F.linear(hidden, weight, bias)  # [B, T, V] on every position
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def _ntp_inputs(dtype=torch.float64, seed=0, vocab=11, dim=6):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, dim, generator=gen, dtype=dtype)  # [B, T, D]
    weight = torch.randn(vocab, dim, generator=gen, dtype=dtype)  # [V, D]
    bias = torch.randn(vocab, generator=gen, dtype=dtype)
    labels = torch.randint(0, vocab, (3, 7), generator=gen)
    labels[0, :3] = -100  # prompt / image positions
    labels[1, 5:] = -100  # right padding
    labels[2, :2] = -100
    labels[2, 6] = -100
    return hidden, labels, weight, bias


@pytest.mark.parametrize("use_bias", [False, True])
def test_next_token_loss_matches_hf_full_vocab(use_bias):
    hidden, labels, weight, bias = _ntp_inputs()
    bias = bias if use_bias else None
    out = next_token_loss(hidden, labels, weight, bias)
    ref = _hf_reference(hidden, labels, weight, bias)
    assert out["ntp_loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert out["ntp_tokens"].dtype == torch.long
    assert out["ntp_tokens"].item() == int((labels[:, 1:] != -100).sum()) == 12


def test_next_token_loss_softcap_and_float32():
    hidden, labels, weight, bias = _ntp_inputs(dtype=torch.float32, seed=1)
    hidden = hidden * 5  # large logits so the softcap changes the result
    out = next_token_loss(hidden, labels, weight, bias, logit_softcap=3.0)["ntp_loss"]
    ref = _hf_reference(hidden, labels, weight, bias, cap=3.0)
    uncapped = _hf_reference(hidden, labels, weight, bias)
    assert out.item() == pytest.approx(ref.item(), abs=1e-5)
    assert abs(out.item() - uncapped.item()) > 0.1


def test_next_token_loss_custom_ignore_index():
    hidden, labels, weight, _ = _ntp_inputs(seed=2)
    relabelled = labels.masked_fill(labels == -100, 0)
    # with ignore_index=0 every label 0 is masked (including the former -100 positions)
    out = next_token_loss(hidden, relabelled, weight, ignore_index=0)["ntp_loss"]
    ref = F.cross_entropy(
        F.linear(hidden, weight)[:, :-1].reshape(-1, weight.shape[0]),
        relabelled[:, 1:].reshape(-1),
        ignore_index=0,
    )
    assert out.item() == pytest.approx(ref.item(), abs=1e-10)


def test_next_token_loss_without_label_tokens_is_zero_with_finite_grad():
    hidden, labels, weight, _ = _ntp_inputs()
    labels = torch.full_like(labels, -100)
    labels[:, 0] = 3  # position 0 is never a target after the shift
    hidden.requires_grad_()
    weight.requires_grad_()
    out = next_token_loss(hidden, labels, weight)
    assert out["ntp_loss"].item() == 0.0
    assert out["ntp_tokens"].item() == 0
    assert out["ntp_loss"].grad_fn is not None
    out["ntp_loss"].backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_next_token_loss_gradcheck():
    hidden, labels, weight, bias = _ntp_inputs(seed=3, vocab=5, dim=3)
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: next_token_loss(h, labels, w, bias)["ntp_loss"], (hidden, weight)
    )
    assert torch.autograd.gradcheck(
        lambda h, w: next_token_loss(h, labels, w, logit_softcap=2.0)["ntp_loss"],
        (hidden, weight),
    )


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("use_bias", [False, True])
def test_linear_cross_entropy_equals_plain_cross_entropy_in_chunks(softcap, use_bias):
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(11, 6, generator=gen, requires_grad=True)
    weight = torch.randn(13, 6, generator=gen, requires_grad=True)
    bias = torch.randn(13, generator=gen, requires_grad=True) if use_bias else None
    y = torch.randint(0, 13, (11,), generator=gen)
    logits = F.linear(h * 3, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ref = F.cross_entropy(logits, y, reduction="sum")
    leaves = [h, weight] + ([bias] if use_bias else [])
    ref_grads = torch.autograd.grad(2.5 * ref, leaves)
    for chunk_elements in (13 * 4, 13 * 100):  # 3 chunks of <= 4 rows; one chunk
        out = linear_cross_entropy(h * 3, weight, bias, y, softcap, chunk_elements=chunk_elements)
        grads = torch.autograd.grad(2.5 * out, leaves)
        assert out.item() == pytest.approx(ref.item(), rel=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert linear_cross_entropy(h, weight, bias, y, softcap).item() == pytest.approx(
            F.cross_entropy(F.linear(h, weight, bias) if softcap is None else
                            softcap * torch.tanh(F.linear(h, weight, bias) / softcap), y, reduction="sum").item(), rel=1e-6)


def test_linear_cross_entropy_keeps_no_vocabulary_sized_tensor_for_backward():
    h = torch.randn(40, 8, requires_grad=True)
    weight = torch.randn(5000, 8)  # frozen head, as in alignment
    y = torch.randint(0, 5000, (40,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        plain = F.cross_entropy(F.linear(h, weight), y, reduction="sum")
    assert any(5000 in s for s in saved)  # the plain way keeps [N, V] tensors
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        fused = linear_cross_entropy(h, weight, None, y)
    assert saved and not any(5000 in s for s in saved)  # only dL/dh [N, D]
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)


def test_next_token_loss_rejects_shifted_labels():
    hidden, labels, weight, _ = _ntp_inputs()
    with pytest.raises(ValueError, match="unshifted"):
        next_token_loss(hidden, labels[:, 1:], weight)


# ----- distributed helper ----------------------------------------------------------------


def test_gather_with_grad_is_identity_without_process_group():
    assert not torch.distributed.is_initialized()
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x
