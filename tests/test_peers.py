"""The peers are the real peers: ToMe, PiToMe and the authors' ATS, each checked against a
reference written here from the published algorithm (not imported from their packages).

- ToMe (Bolya et al., ICLR 2023; facebookresearch/ToMe ``tome/merge.py``, ``tome/patch/timm.py``):
  attention for every token with proportional attention, residual, then bipartite soft
  matching on the head-averaged keys, size-weighted merging, ToMe's token order, the MLP.
- PiToMe (Tran et al., NeurIPS 2024; hchautran/PiToMe ``algo/pitome/merge.py`` ``pitome_vision``,
  ``pitome``, ``pitome_bsm``, ``merge_wavg``; ``algo/pitome/patch/timm.py``): attention for every
  token *without* proportional attention (their block never passes the sizes on), residual,
  energy of the head-averaged keys with margin ``0.75 - 0.75 i / L``, bipartite matching over
  the energy order in the first ``ceil(L / 2)`` layers, energy-protected merging after,
  size-weighted merging, the MLP.
- ATS as the authors released it (adaptivetokensampling/ATS,
  ``libs/models/transformers/ats_block.py``): scores sorted ascending, min-max normalised CDF,
  ``n_ref - 1`` values from the first non-zero CDF entry to 1, nearest entries, unique picks.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ats_vit import SamplingOptions
from ats_vit.budget import Budget, tome_rates
from ats_vit.sampling import Padding, official_select

# ---------------------------------------------------------------- ToMe, as published


def reference_bipartite_soft_matching(metric, r, class_token=True, distill_token=False):
    """ToMe's ``bipartite_soft_matching``: returns its ``merge(x, mode)``."""
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def reference_merging_forward(model, x, plan, proportional):
    """A timm ViT's forward with a merging method's patched blocks, as ToMe's ``ToMeBlock`` /
    ``ToMeAttention`` and PiToMe's ``PiToMeBlock`` / ``PiToMeAttention`` run them: attention
    over every token (with ``log(size)`` added when ``proportional``), the residual, then
    ``plan(i, keys averaged over heads)``'s merge (or None) applied by size (``merge_wavg``),
    then the MLP."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    size = None
    for i, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm1(x)
        b, n, c = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if proportional and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + block.ls1(attn.proj(out))
        merge = plan(i, k.mean(1))
        if merge is not None:
            size = torch.ones_like(x[..., 0, None]) if size is None else size
            x = merge(x * size, mode="sum")
            size = merge(size, mode="sum")
            x = x / size
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


def reference_tome_forward(model, x, rates, distill_token=False):
    """ToMe's patched timm ViT (proportional attention on)."""

    def plan(i, metric):
        r = rates[i]
        return reference_bipartite_soft_matching(metric, r, True, distill_token) if r > 0 else None

    return reference_merging_forward(model, x, plan, proportional=True)


def _deit_tiny_and_images() -> tuple[torch.nn.Module, torch.Tensor]:
    """The reference tests' model and input: timm's DeiT-Tiny with seeded random weights (no
    download) and two seeded images."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    return model, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("r", [8, 16])
def test_tome_gives_the_logits_of_the_published_algorithm(r):
    import ats_vit.timm as ats_timm

    model, x = _deit_tiny_and_images()
    rates = tome_rates(r, 12)
    with torch.no_grad():
        reference = reference_tome_forward(model, x, rates)
        budget = Budget.tome(r, depth=12, num_patches=196)
        budget.apply(model)
        ours = model(x)
        info = ats_timm.last_info(model)
    expected_tokens = [196 - r * (i + 1) for i in range(12)] if r == 8 else None
    if expected_tokens:
        assert info.kept_per_layer[0].tolist() == expected_tokens
    assert (ours - reference).abs().max().item() <= 1e-4, f"max |diff| {(ours - reference).abs().max():.2e}"


def test_tome_keeps_tomes_token_order_and_sizes():
    """After one merge: CLS, the unmerged A tokens, then every B token; sizes add up."""
    from ats_vit.sampling import tome_plan

    torch.manual_seed(0)
    metric = torch.randn(3, 9, 4)  # CLS + 8 candidates: A = 0, 2, 4, 6, 8; B = 1, 3, 5, 7
    sel = tome_plan(metric, keep_count=6, valid=None, num_prefix=1, size=None)
    assert sel.late and sel.padding is None and sel.index.shape == (3, 7)
    for i in range(3):
        index = sel.index[i].tolist()
        a_kept, b_kept = index[1:-4], index[-4:]
        assert index[0] == 0 and b_kept == [1, 3, 5, 7]
        assert a_kept == sorted(a_kept) and all(t % 2 == 0 for t in a_kept) and len(a_kept) == 2
    assert sel.size.sum(dim=1).tolist() == [9.0] * 3


@pytest.mark.parametrize("num_prefix", [1, 2, 5])
@pytest.mark.parametrize("n", [9, 10, 37])
def test_tome_fast_path_plans_what_the_general_one_plans(monkeypatch, num_prefix, n):
    """Without padding, tome_plan takes a shorter path (a stable sort, slots known per
    position); it gives the general path's slots, sources, weights, sizes and merged tokens
    exactly, with tied matches (repeated keys) and tokens that already stand for several
    patches."""
    import ats_vit.sampling as sampling
    from ats_vit.sampling import select_tokens, tome_plan

    taken = []
    fast_path = sampling._tome_plan_unpadded
    monkeypatch.setattr(sampling, "_tome_plan_unpadded", lambda *a: taken.append(1) or fast_path(*a))
    gen = torch.Generator().manual_seed(n + num_prefix)
    for keep_count in sorted({1, 3, (n - num_prefix) // 2, n - num_prefix - 1}):
        for tied in (False, True):
            metric = torch.randn(4, n, 6, generator=gen)
            metric = metric.round() if tied else metric  # many keys equal: ties by position
            size = torch.randint(1, 4, (4, n), generator=gen).float()
            for sizes in (None, size):
                fast = tome_plan(metric, keep_count, None, num_prefix, sizes)
                general = sampling._tome_plan_general(metric, keep_count, None, num_prefix, sizes)
                assert fast.padding is None and general.padding is None and fast.late
                assert fast.merge.whole and not general.merge.whole
                x = torch.randn(4, n, 5, generator=gen)
                merged = select_tokens(x, fast)  # one index_add_ without a spare row
                torch.testing.assert_close(merged, select_tokens(x, general), atol=0, rtol=0)
                assert torch.equal(fast.index, general.index)
                assert torch.equal(fast.merge.dest, general.merge.dest)
                torch.testing.assert_close(fast.merge.weight, general.merge.weight, atol=0, rtol=0)
                torch.testing.assert_close(fast.size, general.size, atol=0, rtol=0)
    assert taken, "the fast path ran"


def test_tome_fast_path_compiles_in_one_graph():
    """Its in-place writes into views (the A tokens' slots, the unmerged positions) must not
    break ``ats_vit.compile``'s fullgraph compilation (dynamo refuses ``out=`` into a view)."""
    import ats_vit.sampling as sampling

    metric = torch.randn(3, 37, 8, generator=torch.Generator().manual_seed(0))
    eager = sampling._tome_plan_unpadded(metric, 20, 1, None)
    torch._dynamo.reset()
    compiled = torch.compile(sampling._tome_plan_unpadded, backend="eager", fullgraph=True)
    traced = compiled(metric, 20, 1, None)
    for got, want in zip(
        traced[:1] + tuple(traced.merge[:2]) + traced[3:4],
        eager[:1] + tuple(eager.merge[:2]) + eager[3:4],
        strict=True,
    ):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_tome_fast_path_constants_are_cached_but_never_shared():
    """The shorter plan caches what is the same for every image of a shape; made under
    inference mode they still serve a pass that trains, and no plan hands out the cache."""
    from ats_vit.sampling import select_tokens, tome_plan

    metric = torch.randn(2, 9, 4)
    with torch.inference_mode():
        first = tome_plan(metric, 5, None, 1, None)
        select_tokens(torch.randn(2, 9, 3), first)  # caches the row offsets in inference mode
        first.index.zero_()
        first.merge.dest.zero_()
    x = torch.randn(2, 9, 3, requires_grad=True)
    again = tome_plan(metric, 5, None, 1, None)
    assert again.index[:, 0].tolist() == [0, 0] and again.index[:, -4:].tolist() == [[1, 3, 5, 7]] * 2
    select_tokens(x, again).sum().backward()
    assert x.grad is not None  # each token's gradient is its share of its slot
    torch.testing.assert_close(x.grad, again.merge.weight[..., None].expand_as(x))


def test_shape_caches_are_bypassed_while_compiling_or_tracing(monkeypatch):
    """Cached per-shape tensors would be baked into a traced or compiled graph as constants
    of one batch size; there they are made afresh."""
    import ats_vit.sampling as sampling

    cpu = torch.device("cpu")
    with torch.inference_mode():  # a miss inside inference mode still makes a normal tensor
        inside = sampling._row_offsets(3, 7, cpu)
    assert not inside.is_inference() and sampling._row_offsets(3, 7, cpu) is inside
    for b in range(1, sampling._SHAPE_CACHE_SIZE + 2):  # a full cache starts afresh, still right
        assert sampling._row_offsets(b, 4, cpu)[-1].item() == 4 * (b - 1)
    assert sampling._row_offsets(3, 5, cpu) is sampling._row_offsets(3, 5, cpu)
    assert sampling._tome_constants(9, 1, 2, cpu)[1] is sampling._tome_constants(9, 1, 2, cpu)[1]
    for switch in ("torch.jit.is_tracing", "torch.compiler.is_compiling"):
        with monkeypatch.context() as m:
            m.setattr(switch, lambda: True)
            assert sampling._row_offsets(3, 5, cpu) is not sampling._row_offsets(3, 5, cpu)
            assert sampling._row_offsets(3, 5, cpu).tolist() == [[0], [5], [10]]
            fresh = sampling._tome_constants(9, 1, 2, cpu)
            assert fresh[1] is not sampling._tome_constants(9, 1, 2, cpu)[1]


def test_tome_schedules_follow_parse_r():
    assert tome_rates(8, 4) == [8, 8, 8, 8]
    assert tome_rates((8, -1.0), 3) == [16, 8, 0]  # ToMe's decreasing schedule
    assert tome_rates([4, 2], 3) == [4, 2, 0]
    budget = Budget.tome(100, depth=3, num_patches=16)  # each layer merges at most half
    assert budget.caps == (8, 4, 2) and budget.sampler == "tome"


# ---------------------------------------------------------------- PiToMe, as released


def reference_pitome_vision(metric, ratio, margin, use_bsm_pitome):
    """PiToMe's ``pitome_vision`` (class token on): returns its ``merge(x, mode)``."""
    metric = metric[:, 1:, :]
    _, t, _ = metric.shape
    r = math.floor(t - t * ratio)
    metric = F.normalize(metric, p=2, dim=-1)
    sim = metric @ metric.transpose(-1, -2)
    energy = F.elu(sim - margin, alpha=1.0).mean(dim=-1)
    indices = torch.argsort(energy, descending=True)
    if use_bsm_pitome:
        return _reference_pitome_bsm(indices, sim, r)
    return _reference_pitome(indices, sim, r)


def _reference_pitome(indices, scores, r):
    b, t, _ = scores.shape
    merge_idx, protected_idx = indices[..., : 2 * r], indices[..., 2 * r :]
    a_idx, b_idx = merge_idx[..., ::2], merge_idx[..., 1::2]
    scores = scores.gather(dim=-1, index=b_idx.unsqueeze(-2).expand(b, t, r))
    scores = scores.gather(dim=-2, index=a_idx.unsqueeze(-1).expand(b, r, r))
    _, dst_idx = scores.max(dim=-1)

    def merge(x, mode="mean"):
        x_cls, x = x[:, :1], x[:, 1:]
        n, _, c = x.shape
        batch_idx = torch.arange(n).unsqueeze_(1)
        protected = x[batch_idx, protected_idx, :]
        src, dst = x[batch_idx, a_idx, :], x[batch_idx, b_idx, :]
        dst = dst.scatter_reduce(-2, dst_idx.unsqueeze(2).expand(n, r, c), src, reduce=mode)
        return torch.cat([x_cls, protected, dst], dim=1)

    return merge


def _reference_pitome_bsm(indices, scores, r):
    b, t, _ = scores.shape
    a_idx, b_idx = indices[..., ::2], indices[..., 1::2]
    batch_idx = torch.arange(b).unsqueeze_(1)
    scores = scores.gather(dim=-1, index=b_idx.unsqueeze(-2).expand(b, t, b_idx.shape[-1]))
    scores = scores.gather(dim=-2, index=a_idx.unsqueeze(-1).expand(b, a_idx.shape[-1], b_idx.shape[-1]))
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x, mode="mean"):
        x_cls, x = x[:, :1], x[:, 1:]
        src, dst = x[batch_idx, a_idx, :], x[batch_idx, b_idx, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([x_cls, unm, dst], dim=1)

    return merge


def reference_pitome_forward(model, x, ratio):
    """PiToMe's patched timm ViT as its authors' ``apply_patch`` sets it: margins
    ``0.75 - 0.75 i / L``, the first ``ceil(L / 2)`` blocks matching by energy-ordered halves,
    no proportional attention (their block never passes the sizes to attention)."""
    depth = len(model.blocks)

    def plan(i, metric):
        margin, use_bsm = 0.75 - 0.75 * (i / depth), i < math.ceil(depth * 0.5)
        return reference_pitome_vision(metric, ratio, margin, use_bsm)

    return reference_merging_forward(model, x, plan, proportional=False)


@pytest.mark.parametrize("ratio", [0.9, 0.95])
def test_pitome_gives_the_logits_of_the_released_code(ratio):
    import ats_vit.timm as ats_timm

    model, x = _deit_tiny_and_images()
    with torch.no_grad():
        reference = reference_pitome_forward(model, x, ratio)
        budget = Budget.pitome(ratio, depth=12, num_patches=196)
        budget.apply(model)
        ours = model(x)
        info = ats_timm.last_info(model)
    tokens, expected = 196, []
    for _ in range(12):
        tokens -= math.floor(tokens - tokens * ratio)
        expected.append(tokens)
    assert info.kept_per_layer[0].tolist() == expected == list(budget.caps)
    assert (ours - reference).abs().max().item() <= 1e-5, f"max |diff| {(ours - reference).abs().max():.2e}"


def test_pitome_energy_is_the_released_elu_mean_without_a_gradient():
    """The energy is written with ``exp`` (torch's CPU ``elu`` is slow); it must equal the
    authors' ``F.elu(sim - margin).mean(-1)`` on similarities across [-1, 1], margins included."""
    from ats_vit.sampling import pitome_energy

    sim = torch.linspace(-1, 1, 4 * 64 * 64).reshape(4, 64, 64).flip(-1).requires_grad_()
    for margin in (0.0, 0.375, 0.75):
        energy = pitome_energy(sim, margin)
        torch.testing.assert_close(energy, F.elu(sim.detach() - margin).mean(-1), atol=1e-6, rtol=0)
        assert not energy.requires_grad
    assert sim.grad is None


def test_pitome_protects_distinct_tokens_and_keeps_position_order():
    """Outside the bipartite layers, the tokens of lowest energy (least like the others) are
    never merged; the output keeps the survivors in position order, sizes add up."""
    from ats_vit.sampling import pitome_plan

    torch.manual_seed(0)
    base = torch.randn(1, 1, 8)
    # tokens 1-6: near copies of one key (high energy); 7-10: distinct keys (low energy)
    crowd = base + 0.01 * torch.randn(2, 6, 8)
    metric = torch.cat((torch.randn(2, 1, 8), crowd, 10 * torch.eye(8)[None, :4].expand(2, -1, -1)), dim=1)
    sel = pitome_plan(metric, keep_count=7, num_prefix=1, size=None, margin=0.5, bipartite=False)
    assert sel.late and sel.padding is None and sel.index.shape == (2, 8)
    for i in range(2):
        index = sel.index[i].tolist()
        assert index[0] == 0 and index == sorted(index)
        assert {7, 8, 9, 10} <= set(index)  # protected: never merged away
    assert sel.size.sum(dim=1).tolist() == [11.0, 11.0]
    dest = sel.merge.dest
    assert (dest[:, 7:] == torch.tensor([4, 5, 6, 7])).all()  # each protected token alone in its slot


def test_pitome_runs_without_proportional_attention():
    """Its authors' block never passes token sizes to attention: after a merge, the keys of
    merged tokens get no ``log(size)`` (ToMe's do)."""
    from ats_vit import AdaptiveTokenSampling

    ats = AdaptiveTokenSampling(4, SamplingOptions(sampler="pitome"))
    assert not ats.proportional and ats.late and not ats.uses_attention_scores
    assert AdaptiveTokenSampling(4, SamplingOptions(sampler="tome")).proportional
    with pytest.raises(ValueError, match="layer's place"):
        ats(None, torch.randn(1, 2, 9, 4), k=torch.randn(1, 2, 9, 4))
    ats.layer = (0, 2)
    padding = Padding(torch.ones(1, 9, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="padded"):
        ats(None, torch.randn(1, 2, 9, 4), padding, k=torch.randn(1, 2, 9, 4))


def test_pitome_schedules_follow_the_released_ratio():
    assert Budget.pitome(0.9, depth=3, num_patches=196).caps == (177, 160, 144)
    assert Budget.pitome(1.0, depth=2, num_patches=10).caps == (10, 10)
    with pytest.raises(ValueError, match="ratio"):
        Budget.pitome(0.4, depth=2, num_patches=10)
    with pytest.raises(TypeError, match="ratio"):
        Budget.pitome("0.9", depth=2, num_patches=10)


# ---------------------------------------------------------------- ATS, as the authors released it


# DCT: a port of OpenToMe's released code (Westlake-AI/OpenToMe, opentome/tome/dct.py:
# dc_matching with its FFT-based dct/idct; opentome/timm/dct.py: DCTBlock, which transforms after
# the MLP, and parse_r for the schedule), kept in the test so ours is checked against theirs


def _reference_dct(metric, norm=None):
    shape = metric.shape
    n = shape[-1]
    metric = metric.contiguous().view(-1, n)
    v = torch.cat([metric[:, ::2], metric[:, 1::2].flip([1])], dim=1)
    vc = torch.fft.fft(v, dim=1)
    k = -torch.arange(n, dtype=metric.dtype)[None, :] * math.pi / (2 * n)
    out = vc.real * torch.cos(k) - vc.imag * torch.sin(k)
    if norm == "ortho":
        out[:, 0] /= math.sqrt(n) * 2
        out[:, 1:] /= math.sqrt(n / 2) * 2
    return 2 * out.view(*shape)


def _reference_idct(metric, norm=None):
    shape = metric.shape
    n = shape[-1]
    metric = metric.contiguous().view(-1, n) / 2
    if norm == "ortho":
        metric[:, 0] *= math.sqrt(n) * 2
        metric[:, 1:] *= math.sqrt(n / 2) * 2
    k = torch.arange(n, dtype=metric.dtype)[None, :] * math.pi / (2 * n)
    w_r, w_i = torch.cos(k), torch.sin(k)
    v_t_r = metric
    v_t_i = torch.cat([metric[:, :1] * 0, -metric.flip([1])[:, :-1]], dim=1)
    v_r = v_t_r * w_r - v_t_i * w_i
    v_i = v_t_r * w_i + v_t_i * w_r
    v = torch.fft.ifft(torch.view_as_complex(torch.stack([v_r, v_i], dim=2)), dim=1).real
    x = v.new_zeros(v.shape)
    x[:, ::2] += v[:, : n - (n // 2)]
    x[:, 1::2] += v.flip([1])[:, : n // 2]
    return x.view(*shape)


def reference_dc_matching(x, r, class_token=True):
    if class_token:
        cls_t = x[:, :1]
        x = x[:, 1:]
    t = x.shape[1]
    r = min(r, t // 2)
    metric = x.float().permute(1, 0, 2)
    spectrum = _reference_dct(metric.transpose(0, 2), norm="ortho").transpose(0, 2)[: t - r]
    x = _reference_idct(spectrum.transpose(0, 2), norm="ortho").transpose(0, 2).permute(1, 0, 2)
    return torch.cat([cls_t, x], dim=1) if class_token else x


def reference_dct_forward(model, x, r):
    """timm's VisionTransformer.forward with OpenToMe's DCTBlock in every block."""
    rates = tome_rates(r, len(model.blocks))
    x = model._pos_embed(model.patch_embed(x))
    x = model.norm_pre(x)
    for block, rate in zip(model.blocks, rates, strict=True):
        x = x + block.attn(block.norm1(x))
        x = x + block.mlp(block.norm2(x))
        if rate > 0:
            x = reference_dc_matching(x, rate)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("r", [4, 13])
def test_dct_gives_the_logits_of_the_released_code(r):
    """Same logits (1e-5) as OpenToMe's DCT on timm's DeiT-Tiny (random weights): the token mix
    after every block's MLP, ``r`` fewer tokens each (at most half), the class token kept."""
    import ats_vit.timm as ats_timm

    model, x = _deit_tiny_and_images()
    with torch.no_grad():
        reference = reference_dct_forward(model, x, r)
        budget = Budget.dct(r, depth=12, num_patches=196)
        budget.apply(model)
        ours = model(x)
        info = ats_timm.last_info(model)
    assert info.kept_per_layer[0].tolist() == list(budget.caps) == [196 - r * (i + 1) for i in range(12)]
    assert (ours - reference).abs().max().item() <= 1e-5, f"max |diff| {(ours - reference).abs().max():.2e}"


def test_dct_transform_is_the_released_fft_pair():
    """The (m x t) matrix equals OpenToMe's FFT-based DCT, truncation and inverse, and leaves
    at least half the tokens (their ``r = min(r, t // 2)``)."""
    from ats_vit.sampling import dct_count, dct_reduce

    x = torch.randn(3, 1 + 37, 16)
    for keep in (37, 30, 19, 5):
        ours = dct_reduce(x, keep, num_prefix=1)
        assert ours.shape[1] == 1 + dct_count(37, keep) == 1 + max(keep, 19)
        reference = reference_dc_matching(x, 37 - keep)
        assert (ours - reference).abs().max().item() <= 1e-5
    assert torch.equal(dct_reduce(x, 37, num_prefix=1), x)  # nothing to cut: x itself


def test_dct_runs_after_the_mlp_and_is_refused_where_tokens_need_patches():
    """A DCT layer attends and runs its MLP on every token; its tokens stand for no patch
    (ids -1), so restore(), padded grids and families that need positions refuse it."""
    from ats_vit import ViT
    from ats_vit.sampling import AdaptiveTokenSampling

    ats = AdaptiveTokenSampling(4, SamplingOptions(sampler="dct"))
    assert ats.after_mlp and not ats.late and not ats.uses_attention_scores
    with pytest.raises(ValueError, match="after its MLP"):
        ats(None, torch.randn(1, 2, 9, 4), k=torch.randn(1, 2, 9, 4))
    with pytest.raises(ValueError, match="dropped must be 'discard'"):
        SamplingOptions(sampler="dct", dropped="fuse")
    model = ViT(
        image_size=32,
        patch_size=8,
        num_classes=3,
        dim=16,
        depth=2,
        heads=2,
        dim_head=8,
        mlp_dim=32,
        max_tokens_per_depth=(12, 8),
        options=SamplingOptions(sampler="dct"),
    ).eval()
    logits, ids = model(torch.randn(2, 3, 32, 32), return_sampled_token_ids=True)
    assert logits.shape == (2, 3) and ids.shape == (2, 8) and (ids == -1).all()


def reference_official_picks(significance, n_ref):
    """The selection of the authors' ``AdaptiveTokenSampler`` (``score_assignment_step``'s
    sort, ``create_ys``, ``inverse_transform_sampling``'s nearest picks and
    ``get_unique_indices``) on given normalised scores (b, N - 1); returns the set of
    candidate indices kept per image."""
    sorted_scores, sorted_indices = torch.sort(significance, descending=False, dim=1)
    b, n = significance.shape
    cdf = torch.cumsum(sorted_scores, dim=1)
    normalized_cdf = (cdf - cdf.min(dim=1)[0].unsqueeze(dim=1)) / (
        (cdf.max(dim=1)[0] - cdf.min(dim=1)[0]) / 1.0
    ).unsqueeze(dim=1)
    # create_ys
    ys = torch.linspace(start=0, end=1.0, steps=n_ref - 1).unsqueeze(0).repeat(b, 1)
    ys_start = (
        torch.min(normalized_cdf + (normalized_cdf == 0).float() * 1e8, dim=1)[0].unsqueeze(-1).expand_as(ys)
    )
    steps = torch.arange(0, n_ref - 1).float().unsqueeze(0).expand_as(ys_start)
    ys = ys_start + (((ys * (n_ref - 2)) - ys_start * steps) / (n_ref - 2))
    ys = ys.unsqueeze(dim=2)
    normalized_cdf = normalized_cdf.unsqueeze(dim=1)
    expanded_ys = torch.Tensor.expand(ys, (b, ys.shape[1], ys.shape[1]))
    diff_tokens = ys.shape[1] - n
    tokens_to_pick_ind = torch.min(torch.abs(expanded_ys - F.pad(normalized_cdf, (diff_tokens, 0))), dim=2)[1]
    tokens_to_pick_ind = tokens_to_pick_ind - diff_tokens
    # get_unique_indices
    sorted_picks = torch.sort(tokens_to_pick_ind, dim=1)[0]
    shift_left = F.pad(sorted_picks[:, 1:], (0, 1), value=1.0)
    unique = torch.where((shift_left - sorted_picks) == 0, n * torch.ones_like(sorted_picks), sorted_picks)
    return [{sorted_indices[i, j].item() for j in row.tolist() if j != n} for i, row in enumerate(unique)]


@pytest.mark.parametrize(
    ("n", "n_ref", "sharpness"), [(196, 197, 3.0), (196, 197, 0.5), (60, 197, 2.0), (36, 37, 4.0)]
)
def test_official_ats_picks_what_the_authors_code_picks(n, n_ref, sharpness):
    gen = torch.Generator().manual_seed(n)
    scores = torch.rand(8, n, generator=gen).pow(sharpness * 4)  # peaked, like trained attention
    scores = scores / scores.sum(dim=1, keepdim=True)
    keep = official_select(scores, n_ref - 1)
    ours = [set(row.nonzero().squeeze(1).tolist()) for row in keep]
    assert ours == reference_official_picks(scores, n_ref)
    counts = keep.sum(dim=1)
    assert counts.unique().numel() > 1, "the count is adaptive through de-duplication"


def test_official_ats_with_a_cap_keeps_the_most_significant_picks():
    from helpers import images, small_vit

    # a cap of N leaves a layer whole for every rule; the authors' K = N is a cap of N - 1
    assert not small_vit((16,) * 4, sampler="official").sampling_layers()[0].needed(17)
    model = small_vit((15,) * 4, peaked=6.0, sampler="official").eval()
    assert model.sampling_layers()[0].needed(17), "samples whenever it has more than 8 candidates"
    with torch.no_grad():
        model(images(4))
    uncapped = model.last_state.trace.kept_per_layer()
    model.set_sampling((15, 9, 9, 9), SamplingOptions(sampler="official"))
    with torch.no_grad():
        model(images(4))
    capped = model.last_state.trace.kept_per_layer()
    assert (capped[:, 1:] <= 9).all() and (capped <= uncapped).all()
    assert (uncapped[:, 0] < 15).any(), "de-duplication alone drops tokens (K = N - 1)"


def test_official_ats_leaves_the_layers_before_a_budgets_start_whole():
    """The authors' ATS samples in any layer with more than 8 candidates, whatever its cap;
    a budget still keeps every token before its start layer, so its cost follows the start."""
    from helpers import images, small_vit

    from ats_vit import family_of
    from ats_vit.budget import configure

    model = small_vit(peaked=6.0).eval()
    family = family_of(model)
    costs = []
    for start in (0, 2, 3):
        budget = Budget(start, (8,) * (4 - start), sampler="official", depth=4, num_patches=16)
        configure(family, budget)
        with torch.inference_mode():
            _, flops = family.forward(images(8, 1))
        kept = family.last_info().kept_per_layer
        assert (kept[:, :start] == 16).all(), (start, kept)
        costs.append(flops.mean().item())
    assert costs[0] < costs[1] < costs[2]
