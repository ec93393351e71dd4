from functools import partial

import pytest
import torch
from helpers import NUM_PATCHES, SMALL, images
from helpers import small_vit as any_vit

from ats_vit import SamplingOptions, ViT, family_of, load_vit_pytorch_state_dict

DROPPING = (16, 8, 6, 6)
small_vit = partial(any_vit, DROPPING)


def seed_vit(schedule, **kw):
    vit_pytorch = pytest.importorskip("vit_pytorch.ats_vit")
    torch.manual_seed(1)
    sizes = {**SMALL, **kw}
    return vit_pytorch.ViT(max_tokens_per_depth=schedule, **sizes)


@pytest.mark.parametrize(
    "sizes",
    [
        {},
        dict(image_size=(32, 48), patch_size=(8, 16), channels=1),
        dict(dim=48, heads=3, dim_head=8, depth=2),
    ],
    ids=["square", "rect-1ch", "narrow-heads"],
)
def test_equals_vit_pytorch_when_nothing_is_dropped(sizes):
    sizes = {**SMALL, **sizes}
    h, w = sizes["image_size"] if isinstance(sizes["image_size"], tuple) else (sizes["image_size"],) * 2
    ph, pw = sizes["patch_size"] if isinstance(sizes["patch_size"], tuple) else (sizes["patch_size"],) * 2
    n = (h // ph) * (w // pw)
    schedule = (n,) * sizes["depth"]
    reference = seed_vit(schedule, **sizes).eval()
    ours = load_vit_pytorch_state_dict(ViT(**sizes, max_tokens_per_depth=schedule), reference.state_dict())
    ours.eval()
    x = torch.randn(3, sizes.get("channels", 3), h, w)
    with torch.no_grad():
        ref_logits, ref_ids = reference(x, return_sampled_token_ids=True)
        logits, ids = ours(x, return_sampled_token_ids=True)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(ids, torch.arange(n).expand(3, n))


def test_dropping_schedule_with_a_cap_above_the_token_count_is_the_dense_model():
    dense, capped = any_vit((16,) * 4).eval(), any_vit((100, 50, 16, 16)).eval()
    capped.load_state_dict(dense.state_dict())
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(capped(x), dense(x))


def test_sampled_token_ids_contract():
    model = small_vit().eval()
    with torch.no_grad():
        logits, ids = model(images(5), return_sampled_token_ids=True)
    assert logits.shape == (5, 10)
    assert ids.dtype == torch.int64 and ids.shape[0] == 5 and ids.shape[1] <= min(DROPPING)
    for row in ids:
        real = row[row >= 0]
        assert torch.all(real[1:] > real[:-1]) and real.max() < NUM_PATCHES
        assert torch.all(row[len(real) :] == -1), "padding is -1 and comes last"
        assert 1 <= len(real) <= min(DROPPING)


@pytest.mark.parametrize("static_shape", [False, True])
def test_eval_is_deterministic_with_default_sampler(static_shape):
    model = small_vit(static_shape=static_shape).eval()
    assert model.sampler == "inverse_transform"
    x = images(4)
    with torch.no_grad():
        a, ids_a = model(x, return_sampled_token_ids=True)
        b, ids_b = model(x, return_sampled_token_ids=True)
    assert torch.equal(a, b) and torch.equal(ids_a, ids_b)


def test_static_shape_gives_the_same_result():
    dynamic, static = small_vit(peaked=8.0).eval(), small_vit(peaked=8.0, static_shape=True).eval()
    x = images(4)
    with torch.no_grad():
        a, ids_a = dynamic(x, return_sampled_token_ids=True)
        b, ids_b = static(x, return_sampled_token_ids=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ids_b.shape[1] == min(DROPPING)
    for ra, rb in zip(ids_a, ids_b, strict=True):
        assert torch.equal(ra[ra >= 0], rb[rb >= 0])


# every deterministic selection rule: the paper's, with the knob, fused, merged, and the peers
RULES = [
    dict(),
    dict(temperature=2.0),
    dict(temperature=0.5, dropped="fuse"),
    dict(sampler="topk"),
    dict(sampler="topk", dropped="fuse"),
    dict(sampler="tome"),
    dict(sampler="pitome"),
    dict(sampler="official"),
    dict(sampler="dct"),
]
RULE_IDS = ["paper", "hot", "cold-fuse", "topk", "evit", "tome", "pitome", "official", "dct"]


@pytest.mark.parametrize("static_shape", [False, True])
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_batch_equals_each_image_alone(static_shape, rule):
    model = small_vit(peaked=8.0, static_shape=static_shape, **rule).eval()
    x = images(6)
    with torch.no_grad():
        batch_logits, batch_ids = model(x, return_sampled_token_ids=True)
        counts = (batch_ids >= 0).sum(1)
        if rule.get("sampler") is None:
            assert counts.unique().numel() > 1, "the test needs images that keep different counts"
        for i in range(6):
            logits, ids = model(x[i : i + 1], return_sampled_token_ids=True)
            torch.testing.assert_close(logits[0], batch_logits[i], atol=1e-5, rtol=1e-5)
            assert torch.equal(ids[0][ids[0] >= 0], batch_ids[i][batch_ids[i] >= 0])


@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_matmul_attention_gives_the_fused_kernels_logits_for_every_rule(monkeypatch, rule):
    """At 17 tokens every layer's attention takes the CPU matmul path; with it turned off
    (the fused kernel everywhere) each rule keeps the same tokens and gives the same logits."""
    import ats_vit.attention as attention

    model = any_vit(peaked=8.0, **rule).eval()
    x = images(6)
    with torch.no_grad():
        logits, ids = model(x, return_sampled_token_ids=True)
        monkeypatch.setattr(attention, "_matmul_attention", lambda *a: False)
        fused_logits, fused_ids = model(x, return_sampled_token_ids=True)
    assert torch.equal(ids, fused_ids)
    torch.testing.assert_close(logits, fused_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["topk", "random"])
def test_fixed_count_peers_keep_exactly_the_cap(sampler):
    model = small_vit(peaked=8.0, sampler=sampler).eval()
    with torch.no_grad():
        _, state = model.forward_tokens(images(5))
        _, ids = model(images(5), return_sampled_token_ids=True)
    assert state.padding is None, "every image keeps the same count, so nothing is padded"
    assert state.trace.kept_per_layer().tolist() == [list(DROPPING)] * 5
    assert ids.shape == (5, min(DROPPING)) and (ids >= 0).all()
    assert torch.all(ids.diff(dim=1) > 0), "kept ids stay in ascending original order"


@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_static_shape_equals_dynamic_for_every_rule(rule):
    dynamic = small_vit(peaked=8.0, **rule).eval()
    static = small_vit(peaked=8.0, static_shape=True, **rule).eval()
    x = images(5)
    with torch.no_grad():
        torch.testing.assert_close(static(x), dynamic(x), atol=1e-5, rtol=1e-5)


def test_set_sampling_changes_the_rule_in_place_and_keeps_the_weights():
    model = small_vit(peaked=8.0).eval()
    modules = model.sampling_layers()
    x = images(3)
    with torch.no_grad():
        paper = model(x)
        model.set_sampling((16, 8, 4, 4), SamplingOptions(dropped="fuse", temperature=2.0))
        assert model.max_tokens_per_depth == (16, 8, 4, 4) and model.options.dropped == "fuse"
        assert model.sampling_layers() == modules, "the same modules, configured in place"
        assert all(b.attn.ats.options.temperature == 2.0 and not b.attn.ats.training for b in model.blocks)
        merged, ids = model(x, return_sampled_token_ids=True)
        assert (ids >= 0).sum(1).max() <= 4 + 1  # the fused token comes on top of the cap
        model.set_sampling(DROPPING, SamplingOptions())
        torch.testing.assert_close(model(x), paper)
    assert not torch.allclose(merged, paper)
    with pytest.raises(ValueError, match="non-increasing"):
        model.set_sampling((8, 16, 4, 4))


@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_gradients_reach_every_parameter(rule):
    model = small_vit(dropout=0.1, **rule).train()
    logits, ids = model(images(4), return_sampled_token_ids=True)
    fused = rule.get("dropped") == "fuse"  # the fused token comes on top of the cap
    floor = 8 if rule.get("sampler") == "official" else 0  # the authors' ATS keeps at least 8
    assert (ids >= 0).sum(1).max() <= max(min(DROPPING), floor) + fused
    logits.logsumexp(-1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_training_jitter_still_gives_valid_selections():
    model = small_vit().train()
    torch.manual_seed(0)
    _, ids = model(images(8), return_sampled_token_ids=True)
    for row in ids:
        real = row[row >= 0]
        assert torch.all(real[1:] > real[:-1])


def test_bfloat16_runs():
    model = small_vit().to(torch.bfloat16).eval()
    with torch.inference_mode():
        logits, ids = model(images(3).to(torch.bfloat16), return_sampled_token_ids=True)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (ids >= 0).sum(1).max() <= min(DROPPING)


def test_autocast_bfloat16_runs_on_float32_weights():
    model = small_vit().eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images(2))
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(max_tokens_per_depth=(16, 8, 10, 6)), ValueError, "non-increasing"),
        (dict(max_tokens_per_depth=(16, 8, 0, 0)), ValueError, r"max_tokens_per_depth\[2\] must be >= 1"),
        (dict(max_tokens_per_depth=(16, 8)), ValueError, "one entry per layer"),
        (dict(max_tokens_per_depth=(16, 8.0, 6, 6)), TypeError, r"max_tokens_per_depth\[1\] must be an int"),
        (dict(max_tokens_per_depth=16), TypeError, "max_tokens_per_depth must be a sequence"),
        (dict(image_size=30), ValueError, "divisible by patch_size"),
        (dict(image_size=(32, 30)), ValueError, "divisible by patch_size"),
        (dict(patch_size=0), ValueError, "patch_size must be >= 1"),
        (dict(image_size=(32, 32, 3)), TypeError, "image_size must be an int or a pair"),
        (dict(sampler="top_k"), ValueError, "sampler must be one of"),
        (dict(sampler="topk", options=SamplingOptions()), ValueError, "give sampler or options"),
        (dict(dim=0), ValueError, "dim must be >= 1"),
        (dict(heads=2.0), TypeError, "heads must be an int"),
        (dict(depth=0), ValueError, "depth must be >= 1"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(emb_dropout="0.1"), TypeError, "emb_dropout must be a float"),
    ],
)
def test_configuration_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ViT(**{**SMALL, "max_tokens_per_depth": DROPPING, **kwargs})


@pytest.mark.parametrize(
    ("make_input", "error", "match"),
    [
        (lambda: images(2).numpy(), TypeError, "must be a torch.Tensor"),
        (lambda: images(2).to(torch.int64), TypeError, "floating point"),
        (lambda: images(2)[0], ValueError, "must have shape"),
        (lambda: images(0), ValueError, "empty batch"),
        (lambda: images(2, channels=1), ValueError, "channels=3"),
        (lambda: images(2, size=64), ValueError, r"image_size=\(32, 32\)"),
        (lambda: images(2).double(), TypeError, "does not match the model's parameters"),
    ],
)
def test_input_errors(make_input, error, match):
    model = small_vit().eval()
    with pytest.raises(error, match=match):
        model(make_input())


def test_load_vit_pytorch_state_dict_errors():
    model = small_vit()
    reference = seed_vit(DROPPING, dim=48, heads=3, dim_head=16)
    with pytest.raises(
        ValueError,
        match=r"49 keys of another shape \(file vs model\) \(cls_token \(1, 1, 48\) vs \(1, 1, 32\)",
    ):
        load_vit_pytorch_state_dict(model, reference.state_dict())
    state = seed_vit(DROPPING).state_dict()
    state.pop("cls_token")
    with pytest.raises(ValueError, match=r"1 missing keys \(cls_token\)"):
        load_vit_pytorch_state_dict(model, state)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_vit_pytorch_state_dict(model, [1, 2])
    with pytest.raises(TypeError, match=r"model must be an ats_vit\.ViT"):
        load_vit_pytorch_state_dict(torch.nn.Linear(2, 2), {})


def test_a_fused_token_counts_as_a_candidate_of_the_next_layer():
    """Documented (README, Semantics): the fused token comes on top of the cap, so a next layer
    with the same cap sees cap + 1 candidates and samples again; dropping keeps the count."""
    counts = {}
    for dropped in ("discard", "fuse"):
        model = any_vit((16, 8, 8, 8), dropped=dropped).eval()
        with torch.inference_mode():
            _, state = family_of(model).run(images(4))
        counts[dropped] = state.trace.kept_per_layer()
    assert (counts["discard"] == torch.tensor([16, 8, 8, 8])).all()
    fused = counts["fuse"]
    assert (fused[:, 1] == 9).all(), "8 kept + the fused token"
    assert (fused[:, 2] < 9).all() and (fused[:, 3] == fused[:, 2]).all()
