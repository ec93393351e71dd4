import pytest
import torch
import torch.nn.functional as F

from ats_vit.attention import SamplingAttention, attend, cls_attention, key_bias
from ats_vit.sampling import Padding


def _padding(mask: torch.Tensor) -> Padding:
    return Padding(mask, mask.flatten().nonzero().squeeze(1))


def test_cls_attention_matches_full_softmax_row():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 6, 8, generator=gen), torch.randn(2, 3, 6, 8, generator=gen)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    full = (q @ k.transpose(-1, -2)) * 8**-0.5
    full = full.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    torch.testing.assert_close(cls_attention(q[:, :, :1], k, mask, 8**-0.5), full[:, :, 0])


def test_cls_attention_of_low_precision_inputs_is_computed_in_float32():
    """bfloat16 q and k (autocast) give the row of their float32 values: the products are not
    rounded to bfloat16 before the sum."""
    gen = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(2, 3, 1, 64, generator=gen).bfloat16(),
        torch.randn(2, 3, 40, 64, generator=gen).bfloat16(),
    )
    row = cls_attention(q, k, None, 0.125)
    assert row.dtype == torch.float32
    torch.testing.assert_close(row, cls_attention(q.float(), k.float(), None, 0.125), atol=0, rtol=0)


def test_padded_keys_are_never_attended():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=gen) for _ in range(3))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = attend(q, k, v, mask)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 3:] = 1e4
    # finite: padded slots in the model always hold finite values (zeros or real tokens)
    v2[1, :, 3:] = -1e4
    torch.testing.assert_close(attend(q, k2, v2, mask), out)
    torch.testing.assert_close(out[1], F.scaled_dot_product_attention(q[1:], k[1:, :, :3], v[1:, :, :3])[0])


def test_a_token_of_size_two_draws_the_attention_of_two_copies():
    """Proportional attention: keys [k0, k1, k1] == keys [k0, k1] with sizes [1, 2]."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 8, generator=gen)
    k, v = torch.randn(2, 3, 2, 8, generator=gen), torch.randn(2, 3, 2, 8, generator=gen)
    copies = attend(q, torch.cat((k, k[:, :, 1:]), 2), torch.cat((v, v[:, :, 1:]), 2), None)
    size = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    torch.testing.assert_close(attend(q, k, v, key_bias(None, size)), copies)
    row = cls_attention(q[:, :, :1], k, key_bias(None, size), 8**-0.5)
    full = cls_attention(q[:, :, :1], torch.cat((k, k[:, :, 1:]), 2), None, 8**-0.5)
    torch.testing.assert_close(row, torch.stack((full[..., 0], full[..., 1] + full[..., 2]), -1))


def test_key_bias_is_none_a_mask_or_log_sizes():
    mask = torch.tensor([[True, True, False]])
    assert key_bias(None, None) is None
    assert key_bias(Padding(mask, None), None) is mask
    bias = key_bias(Padding(mask, None), torch.tensor([[1.0, 4.0, 0.0]]))
    assert bias.tolist() == [[0.0, torch.tensor(4.0).log().item(), float("-inf")]]


def _real(selection) -> torch.Tensor:
    if selection.padding is None:
        return torch.ones_like(selection.index, dtype=torch.bool)
    return selection.padding.mask


def _reference_attention(module: SamplingAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = module.qkv(x).chunk(3, dim=-1)
    b, n, _ = x.shape
    q, k, v = (t.view(b, n, module.heads, -1).transpose(1, 2) for t in (q, k, v))
    attn = (q @ k.transpose(-1, -2) * module.scale).softmax(-1)
    return module.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("max_tokens", [None, 9, 100])
def test_attention_without_dropping_equals_reference(max_tokens):
    torch.manual_seed(0)
    module = SamplingAttention(16, heads=2, dim_head=8, cap=max_tokens).eval()
    x = torch.randn(3, 10, 16)
    out, selection = module(x)
    assert selection is None
    torch.testing.assert_close(out, _reference_attention(module, x), atol=1e-5, rtol=1e-5)


def test_sampling_attention_outputs_equal_the_kept_rows_of_full_attention():
    torch.manual_seed(0)
    module = SamplingAttention(16, heads=2, dim_head=8, cap=4).eval()
    x = torch.randn(3, 12, 16)
    out, selection = module(x)
    assert selection is not None
    reference = _reference_attention(module, x)
    mask = _real(selection)
    for i in range(3):
        rows = selection.index[i][mask[i]]
        torch.testing.assert_close(out[i][mask[i]], reference[i, rows], atol=1e-5, rtol=1e-5)
        assert (out[i][~mask[i]] == 0).all()


def test_sampling_attention_respects_input_padding():
    torch.manual_seed(0)
    module = SamplingAttention(16, heads=2, dim_head=8, cap=3).eval()
    x = torch.randn(2, 9, 16)
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    x[1, 5:] = 1e4  # whatever sits in padded slots must not matter
    out, selection = module(x, _padding(mask))
    alone, alone_sel = module(x[1:, :5])
    kept = _real(selection)[1]
    assert torch.equal(selection.index[1][kept], alone_sel.index[0])
    torch.testing.assert_close(out[1][kept], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys", [5, 12, 32])
@pytest.mark.parametrize("across", [0, 64])  # softmax along the last axis / keys-first
@pytest.mark.parametrize("extra", ["none", "sizes", "padded sizes", "pair"])
def test_matmul_attention_equals_the_fused_kernel(monkeypatch, keys, across, extra):
    """On CPU at few keys attention runs as matmuls (both softmax layouts): the same result as
    the fused kernel, which it must not call."""
    import ats_vit.attention as attention

    gen = torch.Generator().manual_seed(keys)
    q = torch.randn(3, 2, keys - 2, 8, generator=gen)
    k, v = torch.randn(3, 2, keys, 8, generator=gen), torch.randn(3, 2, keys, 8, generator=gen)
    size = torch.randint(1, 4, (3, keys), generator=gen).float()
    padding = None
    if extra == "padded sizes":
        mask = torch.ones(3, keys, dtype=torch.bool)
        mask[1, keys // 2 :] = False
        padding = Padding(mask, None)
    bias = None if extra in ("none", "pair") else key_bias(padding, size)
    pair = torch.randn(3, 2, keys - 2, keys, generator=gen) if extra == "pair" else None
    with monkeypatch.context() as m:
        m.setattr(attention, "_matmul_attention", lambda *a: False)
        fused = attend(q, k, v, bias, scale=0.3, pair=pair)
    monkeypatch.setattr(attention, "SOFTMAX_ACROSS_BELOW", across)
    calls = []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a))
    torch.testing.assert_close(attend(q, k, v, bias, scale=0.3, pair=pair), fused)
    assert not calls


def test_the_fused_kernel_keeps_dropout_bool_masks_and_other_dtypes(monkeypatch):
    import ats_vit.attention as attention

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    attend(q, k, v, None, dropout_p=0.1)
    attend(q, k, v, mask)  # padding masks: the fused kernel is as fast
    attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    attend(torch.randn(2, 2, 9, 8), torch.randn(2, 2, 33, 8), torch.randn(2, 2, 33, 8), None)  # many keys
    assert len(calls) == 4
    attend(q, k, v, None)
    assert len(calls) == 4


@pytest.mark.parametrize("keys", [9, 30])  # keys-first softmax below one vector register, and not
def test_matmul_attention_trains_as_the_fused_kernel(monkeypatch, keys):
    """Under autograd (no dropout) few keys take the matmuls too; their gradients are the
    fused kernel's, with and without a size mask."""
    import ats_vit.attention as attention

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    gen = torch.Generator().manual_seed(keys)
    inputs = [torch.randn(3, 2, 5, 8, generator=gen)]
    inputs += [torch.randn(3, 2, keys, 8, generator=gen) for _ in "kv"]
    matmul_path = attention._matmul_attention
    for bias in (None, torch.rand(3, keys, generator=gen).log()):
        grads = []
        for path in (matmul_path, lambda *a: False):  # matmuls, then the fused kernel
            monkeypatch.setattr(attention, "_matmul_attention", path)
            q, k, v = (t.clone().requires_grad_() for t in inputs)
            out = attend(q, k, v, bias)
            out.pow(2).sum().backward()
            grads.append((out, q.grad, k.grad, v.grad))
        for matmul, fused in zip(*grads, strict=True):
            torch.testing.assert_close(matmul, fused)
    assert len(calls) == 2, "the fused kernel ran only where it was switched off"


def _bucketed(counts: list[int], width: int, num_prefix: int = 1) -> Padding:
    """A padded grid of ``width`` slots whose images hold ``counts`` real tokens, with buckets."""
    from ats_vit.sampling import bucket_images

    real = torch.tensor(counts)
    mask = torch.arange(width) < real[:, None]
    buckets = bucket_images(real, counts)
    assert buckets is not None
    return Padding(mask, mask.flatten().nonzero().squeeze(1), buckets)


def test_buckets_sort_the_images_and_cover_the_batch():
    from ats_vit.sampling import MIN_BUCKET, MIN_BUCKET_WIDTH, MIN_BUCKETS, bucket_images

    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(30, 120, (40,), generator=gen)
    counts[[3, 7]] = 119  # ties keep batch order, on the host as on the device
    buckets = bucket_images(counts, counts.tolist())
    assert buckets is not None and len(buckets.groups) == 40 // MIN_BUCKET
    assert buckets.order.tolist() == list(buckets.ranked)
    assert sorted(buckets.ranked) == list(range(40)) and buckets.counts == tuple(counts.tolist())
    ranked = counts[buckets.order]
    assert (ranked[:-1] >= ranked[1:]).all() and buckets.ranked.index(3) < buckets.ranked.index(7)
    assert [g[0] for g in buckets.groups[1:]] == [g[1] for g in buckets.groups[:-1]]
    assert buckets.groups[0][0] == 0 and buckets.groups[-1][1] == 40
    for start, stop, width in buckets.groups:
        assert width == int(counts[buckets.order[start:stop]].max())
    # too few images, counts too alike to pay, or a device the buckets were not measured on: none
    few = counts[: MIN_BUCKETS * MIN_BUCKET - 1]
    assert bucket_images(few, few.tolist()) is None
    assert bucket_images(torch.full((40,), 90), [90] * 40) is None
    narrow = counts * (MIN_BUCKET_WIDTH - 1) // 119  # the same spread on a narrow grid
    assert int(narrow.max()) == MIN_BUCKET_WIDTH - 1 and bucket_images(narrow, narrow.tolist()) is None
    assert bucket_images(counts.to("meta"), counts.tolist()) is None


@pytest.mark.parametrize("keys_on", ["same grid", "unpadded input", "padded input"])
@pytest.mark.parametrize("extra", ["mask", "sizes", "pair"])
def test_bucketed_attention_equals_attention_over_the_whole_grid(keys_on, extra):
    """Each bucket at its own width gives every real query the output (and, training, the
    gradients) of attention over the whole padded grid."""
    from ats_vit.attention import attend_padded

    gen = torch.Generator().manual_seed(0)
    b, h, d, m = 32, 2, 8, 80
    counts = torch.randint(3, m + 1, (b,), generator=gen).tolist()
    counts[0] = m
    q_padding = _bucketed(counts, m)
    if keys_on == "same grid":
        k_padding, n = q_padding, m
    elif keys_on == "unpadded input":
        k_padding, n = None, 90
    else:
        n = 90
        k_padding = _bucketed([min(n, c + int(torch.randint(0, 10, (1,), generator=gen))) for c in counts], n)
    inputs = [torch.randn(b, h, m, d, generator=gen)] + [torch.randn(b, h, n, d, generator=gen) for _ in "kv"]
    size = torch.randint(1, 4, (b, n), generator=gen).float()
    bias = key_bias(k_padding, size if extra == "sizes" else None)
    pair = torch.randn(b, h, m, n, generator=gen) if extra == "pair" else None
    results = []
    for padding in (q_padding, q_padding._replace(buckets=None)):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = attend_padded(q, k, v, bias, 0.0, None, pair, padding, k_padding)
        real = padding.mask[:, None, :, None]
        (out * real).pow(2).sum().backward()
        results.append((out * real, q.grad * real, k.grad, v.grad))
    for bucketed, whole in zip(*results, strict=True):
        torch.testing.assert_close(bucketed, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropped", ["discard", "fuse"])
def test_a_model_with_adaptive_counts_gives_the_same_logits_in_buckets(monkeypatch, dropped):
    """End to end: ATS's adaptive counts (several sampling layers, dropped tokens discarded or
    fused) with and without buckets give the same logits, and buckets did run."""
    import ats_vit.attention as attention
    import ats_vit.sampling as sampling
    from ats_vit import SamplingOptions, ViT
    from ats_vit.testing import sharpen_queries

    torch.manual_seed(0)
    model = ViT(
        image_size=32,
        patch_size=4,
        num_classes=10,
        dim=32,
        depth=4,
        max_tokens_per_depth=(56, 40, 24, 12),
        heads=2,
        mlp_dim=64,
        options=SamplingOptions(dropped=dropped),
    ).eval()
    with torch.no_grad():  # peakier attention than at initialisation: counts that differ by image
        sharpen_queries(model, 4.0)
    x = torch.randn(32, 3, 32, 32)
    monkeypatch.setattr(sampling, "MIN_BUCKET_WIDTH", 0)  # this small model's grid is 65 wide at most
    runs = []
    real = attention.attend_padded
    monkeypatch.setattr(
        attention,
        "attend_padded",
        lambda *a: runs.append(a[7] is not None and a[7].buckets is not None) or real(*a),
    )
    with torch.no_grad():
        bucketed = model(x)
        assert any(runs)
        monkeypatch.setattr(sampling, "BUCKET_DEVICES", ())
        runs.clear()
        whole = model(x)
        assert runs and not any(runs)
    torch.testing.assert_close(bucketed, whole, atol=1e-5, rtol=1e-5)
