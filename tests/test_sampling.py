import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ats_vit.options import Rule, SamplingOptions
from ats_vit.sampling import (
    AdaptiveTokenSampling,
    Padding,
    compact,
    gumbel_sample,
    inverse_transform_sample,
    keep_mask,
    random_select,
    select_tokens,
    sharpen,
    significance_scores,
    tokenwise,
    topk_select,
)


@st.composite
def layer_inputs(draw):
    """Random CLS attention, values and (maybe) padding for one layer, plus an ATS config."""
    b = draw(st.integers(1, 4))
    p = draw(st.integers(1, 3))
    n_cand = draw(st.integers(1, 24))
    heads = draw(st.integers(1, 3))
    k = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    n = p + n_cand
    cls_attn = (3 * torch.randn(b, heads, n, generator=gen)).softmax(-1)
    v = torch.randn(b, heads, n, 4, generator=gen)
    padded = draw(st.booleans())
    padding_mask = None
    if padded:
        counts = torch.tensor([draw(st.integers(1, n_cand)) for _ in range(b)])
        padding_mask = torch.arange(n) < (p + counts)[:, None]
    return dict(
        cls_attn=cls_attn,
        v=v,
        mask=padding_mask,
        k=k,
        p=p,
        sampler=draw(st.sampled_from(["inverse_transform", "gumbel", "topk", "random"])),
        static=draw(st.booleans()),
        training=draw(st.booleans()),
        temperature=draw(st.sampled_from([1.0, 0.3, 3.0])),
        dropped=draw(st.sampled_from(["discard", "fuse"])),
        keys=torch.randn(b, heads, n, 4, generator=gen),
        size=draw(st.sampled_from([None, "random"])),
    )


@settings(max_examples=150, deadline=None)
@given(layer_inputs())
def test_selection_properties(case):
    p, k, mask = case["p"], case["k"], case["mask"]
    b, _, n = case["cls_attn"].shape
    dropped = case["dropped"]
    options = SamplingOptions(
        case["sampler"], static_shape=case["static"], temperature=case["temperature"], dropped=dropped
    )
    ats = AdaptiveTokenSampling(k, options, num_prefix_tokens=p)
    ats.train(case["training"])
    padding = None if mask is None else Padding(mask, mask.flatten().nonzero().squeeze(1))
    size = None
    if case["size"] is not None:
        size = torch.randint(1, 4, (b, n)).float()
        if mask is not None:
            size = size.masked_fill(~mask, 0.0)
    sel = ats(case["cls_attn"], case["v"], padding, k=case["keys"], size=size)
    index = sel.index
    m = index.shape[1]
    out_mask = torch.ones_like(index, dtype=torch.bool) if sel.padding is None else sel.padding.mask
    valid_in = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    n_valid = valid_in[:, p:].sum(1)
    sampled = ats.needed(n)

    fused = dropped == "fuse"
    if sampled:
        assert m <= p + k + fused
        if case["static"]:
            assert m == p + k + fused
    else:
        assert m == n and sel.padding == padding, "a layer with few enough tokens keeps the input as is"
    for i in range(b):
        row = index[i][out_mask[i]]
        assert torch.equal(row[:p], torch.arange(p)), "prefix tokens come first and are always kept"
        kept = row[p:]
        assert torch.all(kept[1:] > kept[:-1]), "kept ids are unique and ascending"
        assert torch.all((kept >= p) & (kept < n)), "kept ids in range"
        assert valid_in[i, kept].all(), "padding is never kept"
        assert 1 <= kept.numel() <= (k + fused if sampled else n - p)
        if n_valid[i] <= k:
            assert kept.numel() == n_valid[i], "an image with few enough tokens keeps them all"
        elif case["sampler"] in ("topk", "random"):
            assert kept.numel() == k + fused, "the fixed-count peers keep exactly k (and the fused token)"
        # real slots form a prefix of the row
        count = int(out_mask[i].sum())
        assert torch.equal(out_mask[i], torch.arange(m) < count)
    if sel.padding is not None and sel.padding.rows is not None:
        assert torch.equal(sel.padding.rows, sel.padding.mask.flatten().nonzero().squeeze(1))
    if not sampled:
        return
    in_size = (torch.ones(b, n) if size is None else size) * valid_in
    if dropped == "discard":
        assert sel.merge is None
        if size is not None:
            torch.testing.assert_close(sel.size * out_mask, in_size.gather(1, index) * out_mask)
    else:
        # merging and fusing lose no patch: every valid token joins exactly one real slot
        assert sel.merge is not None and sel.size is not None
        torch.testing.assert_close(sel.size.sum(1), in_size.sum(1))
        dest = sel.merge.dest
        real_dest = (dest < m) & valid_in
        assert torch.equal(real_dest, valid_in), "valid tokens all land in a slot, padding in none"
        assert out_mask.gather(1, dest.clamp_max(m - 1))[real_dest].all(), "never into a padded slot"
        assert (dest[:, :p] == torch.arange(p)).all(), "prefix tokens stay alone in their own slot"
        # the weights of a slot sum to 1, so a constant input stays that constant
        x = torch.full((b, n, 3), 2.5)
        torch.testing.assert_close(select_tokens(x, sel)[out_mask], torch.full((int(out_mask.sum()), 3), 2.5))


def test_inverse_transform_known_example():
    scores = torch.tensor([[0.5, 0.25, 0.25]])
    # points .125 .375 .625 .875 against CDF .5 .75 1
    assert inverse_transform_sample(scores, 4).tolist() == [[0, 0, 1, 2]]
    assert inverse_transform_sample(scores, 1).tolist() == [[0]]


def test_inverse_transform_concentrated_mass_keeps_one_token():
    scores = torch.zeros(2, 50)
    scores[0, 7] = 1.0
    scores[1, 49] = 1.0
    picks = inverse_transform_sample(scores, 20)
    assert keep_mask(picks, 50).sum(1).tolist() == [1, 1]
    assert picks[0].unique().tolist() == [7] and picks[1].unique().tolist() == [49]


@settings(max_examples=100, deadline=None)
@given(
    # exact zeros (padding-like) mixed with masses that float32 represents
    st.lists(st.one_of(st.just(0.0), st.floats(1e-4, 1.0)), min_size=1, max_size=40).filter(any),
    st.integers(1, 64),
    st.booleans(),
)
def test_inverse_transform_picks_only_positive_mass(raw, k, jitter):
    scores = torch.tensor([raw])
    scores = scores / scores.sum()
    picks = inverse_transform_sample(scores, k, jitter=jitter)
    assert picks.shape == (1, k)
    assert (scores[0, picks[0]] > 0).all()
    assert torch.all(picks[0, 1:] >= picks[0, :-1]), "evenly ordered points give ordered picks"


def test_inverse_transform_eval_is_deterministic_and_jitter_is_not():
    scores = torch.rand(8, 100).softmax(-1)
    assert torch.equal(inverse_transform_sample(scores, 30), inverse_transform_sample(scores, 30))
    torch.manual_seed(0)
    a = inverse_transform_sample(scores, 30, jitter=True)
    b = inverse_transform_sample(scores, 30, jitter=True)
    assert not torch.equal(a, b)


def test_sharpen_is_the_identity_at_temperature_one_and_a_power_otherwise():
    scores = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    assert sharpen(scores, 1.0) is scores
    hot = sharpen(scores, 2.0)
    expected = scores.sqrt() / scores.sqrt().sum()
    torch.testing.assert_close(hot, expected)
    assert hot[0, 3] == 0.0, "padding stays at zero mass"
    torch.testing.assert_close(
        sharpen(scores, 1e3), torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]]), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(sharpen(scores, 1e-3), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_temperature_is_a_smooth_monotone_cost_knob():
    # peaked scores, as in trained models: the kept count grows with the temperature
    gen = torch.Generator().manual_seed(0)
    scores = (4 * torch.randn(256, 196, generator=gen)).softmax(-1)
    counts = []
    for t in (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0):
        picks = inverse_transform_sample(sharpen(scores, t), 98)
        counts.append(keep_mask(picks, 196).sum(1).float().mean().item())
    assert all(b > a for a, b in itertools.pairwise(counts)), counts
    assert counts[0] < 5 and counts[-1] > 97


def test_fuse_adds_the_significance_weighted_mean_of_the_dropped_tokens():
    # one head, one prefix token; candidate values have norm 1, so significance = attention
    attn = torch.tensor([[[0.0, 0.6, 0.2, 0.1, 0.1]]])
    v = torch.zeros(1, 1, 5, 2)
    v[..., 0] = 1.0
    ats = AdaptiveTokenSampling(1, SamplingOptions("topk", dropped="fuse")).eval()
    sel = ats(attn, v, k=torch.randn(1, 1, 5, 2))
    # keeps token 1; the fused token sits where the most significant dropped token (2) was
    assert sel.index.tolist() == [[0, 1, 2]]
    assert sel.size.tolist() == [[1.0, 1.0, 3.0]]
    x = torch.arange(5.0)[None, :, None]
    fused = (0.2 * 2 + 0.1 * 3 + 0.1 * 4) / 0.4
    torch.testing.assert_close(select_tokens(x, sel)[0, :, 0], torch.tensor([0.0, 1.0, fused]))


def test_fuse_with_more_prefix_tokens_than_candidates():
    """Three prefix tokens (CLS and registers) and two candidates, one kept: the prefix keeps
    its own rows (a bug once built the prefix weights from the candidates' width)."""
    attn = torch.tensor([[[0.2, 0.1, 0.1, 0.4, 0.2]]])
    v = torch.zeros(1, 1, 5, 2)
    v[..., 0] = 1.0
    ats = AdaptiveTokenSampling(1, SamplingOptions("topk", dropped="fuse"), num_prefix_tokens=3).eval()
    sel = ats(attn, v, k=torch.randn(1, 1, 5, 2))
    assert sel.index.tolist() == [[0, 1, 2, 3, 4]] and sel.size.tolist() == [[1.0] * 5]
    x = torch.arange(5.0)[None, :, None]
    torch.testing.assert_close(select_tokens(x, sel), x)


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 12])
def test_head_sum_sums_the_heads_of_strided_keys(heads):
    """ToMe's metric, summed by halves, equals the sum over heads (strided keys as projected)."""
    from ats_vit.sampling import head_sum

    qkv = torch.randn(2, 5, 3, heads, 4)
    k = qkv.permute(2, 0, 3, 1, 4)[1]  # (b, h, n, d), as the attention's keys are
    torch.testing.assert_close(head_sum(k), k.sum(dim=1))


def test_tome_keeps_a_fixed_count_and_conserves_size():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(3, 2, 17, 4, generator=gen)
    v = torch.randn(3, 2, 17, 4, generator=gen)
    sel = AdaptiveTokenSampling(10, SamplingOptions("tome")).eval()(None, v, k=k)
    assert sel.padding is None and sel.index.shape == (3, 11)
    assert sel.size.sum(1).tolist() == [17.0] * 3
    assert (sel.merge.dest[:, 0] == 0).all()


def test_significance_scores_formula_and_normalisation():
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 3, 5, generator=gen)
    v = torch.randn(2, 3, 5, 4, generator=gen)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    s = significance_scores(attn, v, valid)
    raw = (attn * v.norm(dim=-1)).sum(1)
    expected0 = raw[0] / raw[0].sum()
    expected1 = torch.cat((raw[1, :3] / raw[1, :3].sum(), torch.zeros(2)))
    torch.testing.assert_close(s, torch.stack((expected0, expected1)))


def test_significance_scores_degenerate_rows_fall_back_to_uniform():
    attn = torch.zeros(2, 1, 4)
    attn[1, 0, 0] = float("nan")
    v = torch.ones(2, 1, 4, 2)
    valid = torch.tensor([[True, True, False, False], [True] * 4])
    s = significance_scores(attn, v, valid)
    torch.testing.assert_close(s, torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25] * 4]))


def test_gumbel_never_picks_padding():
    scores = torch.full((3, 10), 0.1)
    valid = torch.arange(10) < torch.tensor([[2], [5], [10]])
    picks = gumbel_sample(scores, 50, valid, generator=torch.Generator().manual_seed(0))
    assert valid.gather(1, picks).all()


def test_topk_select_ranks_by_head_mean_and_skips_padding():
    # head means: [0.3, 0.25, 0.5, 0.9]; the last token is padding
    attn = torch.tensor([[[0.2, 0.4, 0.1, 0.9], [0.4, 0.1, 0.9, 0.9]]])
    valid = torch.tensor([[True, True, True, False]])
    assert sorted(topk_select(attn, 2, valid)[0].tolist()) == [0, 2]
    assert sorted(topk_select(attn, 2)[0].tolist()) == [2, 3]


def test_random_select_is_uniform_over_valid_tokens():
    valid = torch.arange(10) < torch.tensor([[4], [10]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 10)
    for _ in range(400):
        picks = random_select(valid, 3, generator=gen)
        assert (picks.sort(1).values.diff(dim=1) > 0).all(), "picks are distinct"
        counts += keep_mask(picks, 10)
    assert (counts[0, 4:] == 0).all(), "padding is never picked"
    # each valid token is picked with probability 3/4 (first row) and 3/10 (second)
    torch.testing.assert_close(counts[0, :4] / 400, torch.full((4,), 0.75), atol=0.08, rtol=0)
    torch.testing.assert_close(counts[1] / 400, torch.full((10,), 0.3), atol=0.08, rtol=0)


def test_compact_orders_and_pads():
    keep = torch.tensor([[False, True, False, True], [True, False, False, False]])
    sel = compact(keep, num_prefix=1)
    assert sel.index[0].tolist() == [0, 2, 4]
    assert sel.index[1, :2].tolist() == [0, 1]
    assert sel.padding.mask.tolist() == [[True, True, True], [True, True, False]]
    assert sel.padding.rows.tolist() == [0, 1, 2, 3, 4]
    static = compact(keep, size=4, num_prefix=1)
    assert static.index.shape == (2, 5) and static.padding.rows is None
    assert static.padding.mask.sum(1).tolist() == [3, 2]


def test_compact_packs_only_grids_with_enough_padding():
    keep = torch.ones(40, 33, dtype=torch.bool)
    keep[0, 5] = False  # 1 padded slot of 40 * 33: packing would cost more than it saves
    sel = compact(keep, num_prefix=1)
    assert sel.index.shape == (40, 34) and sel.padding.rows is None
    assert sel.padding.mask.sum().item() == 40 * 34 - 1 and not sel.padding.mask[0, -1]
    keep[:4, :10] = False  # 40 padded slots of 1360 (2.9%): still below 1/32
    assert compact(keep, num_prefix=1).padding.rows is None
    keep[:8, :10] = False  # 80 of 1360 (5.9%): packed
    rows = compact(keep, num_prefix=1).padding.rows
    assert rows is not None and rows.numel() == 40 * 34 - 80


def test_compact_without_padding_returns_none():
    keep = torch.tensor([[True, False, True], [False, True, True]])
    sel = compact(keep)
    assert sel.padding is None
    assert sel.index.tolist() == [[0, 2], [1, 2]]


def test_tokenwise_computes_real_rows_only():
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    padding = Padding(mask, mask.flatten().nonzero().squeeze(1))
    seen = []

    def fn(t):
        seen.append(t.shape[0])
        return t * 2

    out = tokenwise(fn, x, padding)
    assert seen == [4]
    torch.testing.assert_close(out[mask], x[mask] * 2)
    assert (out[~mask] == 0).all()
    assert torch.equal(tokenwise(fn, x, None), x * 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(cap=0), ValueError, "cap must be >= 1"),
        (dict(cap=2.5), TypeError, "cap must be an int"),
        (dict(cap=True), TypeError, "cap must be an int"),
        (dict(cap=4, num_prefix_tokens=0), ValueError, "num_prefix_tokens must be >= 1"),
        (dict(cap=4, options="gumbel"), TypeError, "options must be an ats_vit.SamplingOptions"),
    ],
)
def test_ats_module_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaptiveTokenSampling(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(sampler="top_k"), ValueError, "sampler must be one of"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature="hot"), TypeError, "temperature must be a float"),
        (dict(dropped="keep"), ValueError, "dropped must be one of"),
        (dict(sampler="tome", dropped="discard"), ValueError, "dropped must be 'merge'"),
        (dict(sampler="topk", dropped="merge"), ValueError, "dropped='merge' belongs to sampler='tome'"),
        (dict(static_shape=1), TypeError, "static_shape must be a bool"),
    ],
)
def test_sampling_options_are_checked_once_when_made(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingOptions(**kwargs)


def test_configure_changes_the_cap_and_options_in_place():
    ats = AdaptiveTokenSampling(8)
    ats.configure(3, SamplingOptions("topk"))
    assert (ats.cap, ats.sampler, ats.dropped, ats.rule) == (3, "topk", "discard", Rule.FIXED)
    ats.configure(5)  # options kept
    assert (ats.cap, ats.sampler) == (5, "topk")
    assert SamplingOptions("tome").dropped == "merge" and SamplingOptions().dropped == "discard"


def test_the_0_x_name_of_the_cap_still_works_and_warns():
    with pytest.warns(
        DeprecationWarning,
        match=r"AdaptiveTokenSampling\(max_tokens=\) is deprecated .* use AdaptiveTokenSampling\(cap=\)",
    ):
        ats = AdaptiveTokenSampling(max_tokens=6)
    assert ats.cap == 6
    with pytest.warns(DeprecationWarning, match=r"AdaptiveTokenSampling.max_tokens is deprecated"):
        assert ats.max_tokens == 6
    with pytest.raises(TypeError, match="AdaptiveTokenSampling needs cap"):
        AdaptiveTokenSampling()


def test_merging_needs_the_keys():
    ats = AdaptiveTokenSampling(3, SamplingOptions(sampler="tome"))
    v = torch.randn(1, 2, 9, 4)
    with pytest.raises(ValueError, match="needs the keys k"):
        ats(torch.rand(1, 2, 9).softmax(-1), v)
