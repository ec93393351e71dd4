import pytest
import torch

from ats_vit.data import DemoConfig, cluttered_digits, image_folder

SMALL = DemoConfig(
    canvas=32, digit=16, fragments=3, fragment=4, train_copies=1, test_copies=1, test_fraction=0.2, seed=3
)


def test_cluttered_digits_is_deterministic_and_well_formed():
    first, second = cluttered_digits(SMALL), cluttered_digits(SMALL)
    for a, b in zip(first, second, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))
    images, labels = first.train.tensors
    assert images.shape[1:] == (1, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(labels.tolist()) == set(range(10))
    assert sum(len(split) for split in first) == 1797  # every bundled digit, split once
    assert len(first.test) == round(0.2 * 1797) and len(first.val) == round(0.1 * 1797)


def test_splits_hold_disjoint_digits():
    # with no clutter on a canvas the size of a digit, every image is exactly its digit
    cfg = DemoConfig(canvas=16, digit=16, fragments=0, fragment=4, train_copies=1, test_copies=1, seed=1)
    splits = cluttered_digits(cfg)
    flat = [split.tensors[0].flatten(1) for split in splits]
    for i in range(3):
        for j in range(i + 1, 3):
            same = (flat[i][:, None, :] == flat[j][None, :, :]).all(-1)
            assert not same.any(), "no digit appears in two splits"


def test_training_copies_leave_val_and_test_unchanged():
    more = cluttered_digits(DemoConfig(**{**SMALL.__dict__, "train_copies": 2}))
    base = cluttered_digits(SMALL)
    assert len(more.train) == 2 * len(base.train)
    for name in ("val", "test"):
        assert torch.equal(getattr(more, name).tensors[0], getattr(base, name).tensors[0])


def test_most_patches_are_background():
    test = cluttered_digits(SMALL).test
    images = test.tensors[0]
    patches = images.unfold(2, 8, 8).unfold(3, 8, 8)  # (n, 1, 4, 4, 8, 8)
    empty = (patches.amax(dim=(-1, -2)) == 0).float().mean()
    assert empty > 0.3


def test_another_seed_gives_other_placements():
    a = cluttered_digits(SMALL).test.tensors[0]
    b = cluttered_digits(DemoConfig(**{**SMALL.__dict__, "seed": 4})).test.tensors[0]
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (DemoConfig(canvas=8, digit=16), "fragment <= digit <= canvas"),
        (DemoConfig(test_fraction=1.0), "test_fraction"),
        (DemoConfig(val_fraction=0.0), "val_fraction"),
        (DemoConfig(val_fraction=0.5, test_fraction=0.5), "val_fraction \\+ test_fraction"),
        (DemoConfig(train_copies=0), "train_copies must be >= 1"),
        (DemoConfig(test_copies=0), "test_copies must be >= 1"),
        (DemoConfig(align=0), "align must be >= 1"),
    ],
)
def test_bad_demo_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        cluttered_digits(cfg)


def test_image_folder_loads_and_reports_bad_folders(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    with pytest.raises(ValueError, match="does not exist"):
        image_folder(tmp_path / "missing", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        image_folder(tmp_path / "empty", 32)
    (tmp_path / "noimages" / "cat").mkdir(parents=True)
    (tmp_path / "noimages" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no readable images"):
        image_folder(tmp_path / "noimages", 32)
    for cls in ("cat", "dog"):
        (tmp_path / "ok" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 50), color=(10, 200, 30)).save(tmp_path / "ok" / cls / "a.png")
    data = image_folder(tmp_path / "ok", 32)
    image, label = data[1]
    assert image.shape == (3, 32, 32) and label == 1


def test_image_folders_are_read_in_the_models_channel_count(tmp_path):
    pytest.importorskip("torchvision")
    from helpers import image_folder_tree

    root = image_folder_tree(tmp_path / "data", splits=("val",), mode="L")
    gray = image_folder(root / "val", 16, channels=1)
    image, _ = gray[0]
    assert image.shape == (1, 16, 16) and image.min() >= 0.0 and image.max() <= 1.0, "as the demo data"
    rgb, _ = image_folder(root / "val", 16)[0]
    assert rgb.shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"channels must be 1 \(grayscale\) or 3 \(RGB\)"):
        image_folder(root / "val", 16, channels=2)


def test_glyph_splits_are_seeded_independent_draws_at_196_tokens():
    from ats_vit.glyphs import GlyphConfig, glyph_split

    cfg = GlyphConfig(train=64, val=32, test=48)
    test = glyph_split("test", cfg)
    images, labels = test.tensors
    assert images.shape == (48, 1, 56, 56) and (56 // 4) ** 2 == 196
    assert images.min() >= 0.0 and images.max() <= 1.0 and set(labels.tolist()) <= set(range(10))
    assert torch.equal(glyph_split("test", cfg).tensors[0], images), "the same split on every call"
    assert not torch.equal(glyph_split("val", cfg).tensors[0][:32], images[:32]), "splits are distinct draws"
    # the digit is the brightest glyph: its pixels reach full intensity, the letters' do not
    assert (images.flatten(1).amax(1) > 0.9).all()
    with pytest.raises(ValueError, match="split must be one of"):
        glyph_split("calib", cfg)


def test_source_items_count_the_demos_copies_once():
    from ats_vit.data import load_split, source_items

    test = load_split("demo", "test", 48)
    items = source_items("demo", "test", len(test))
    assert items.unique().numel() * 3 == len(test)
    labels = test.tensors[1]
    assert all(torch.equal(labels[items == i], labels[items == i][:1].expand(3)) for i in range(5))
    assert torch.equal(source_items("glyphs", "test", 7), torch.arange(7))


def test_bundled_data_seeds_draw_other_splits():
    from ats_vit.data import bundled, load_split, source_items

    assert bundled("demo") == ("demo", 0) and bundled("glyphs@12") == ("glyphs", 12)
    assert bundled("some/folder") is None and bundled("demonstration") is None
    plain, zero, other = (load_split(spec, "test", 48).tensors for spec in ("demo", "demo@0", "demo@2"))
    assert torch.equal(plain[0], zero[0]), "@0 is the plain name"
    assert plain[0].shape == other[0].shape and not torch.equal(plain[0], other[0])
    items = source_items("demo@2", "test", len(other[1]))
    labels = other[1]
    assert all(torch.equal(labels[items == i], labels[items == i][:1].expand(3)) for i in range(20))
    for bad in ("demo@", "demo@-1", "glyphs@x"):
        with pytest.raises(ValueError, match="after '@' comes the data seed"):
            load_split(bad, "test", 48)
    with pytest.raises(ValueError, match="the bundled data sets: demo, glyphs, or NAME@SEED"):
        load_split("no-such-folder", "test", 48)


def test_an_image_far_from_the_models_size_is_named_once(tmp_path):
    """1x1 and 4096x4096 images were resized without a word."""
    pytest.importorskip("torchvision")
    from PIL import Image

    from ats_vit.data import image_folder

    folder = tmp_path / "val" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(folder / "tiny.png")
    Image.new("RGB", (4, 4)).save(folder / "tiny2.png")
    data = image_folder(tmp_path / "val", 32)
    with pytest.warns(UserWarning, match=r"tiny.png is 4x4 pixels and is resized to the model's 32") as seen:
        data[0], data[1]
    assert len([w for w in seen if "resized" in str(w.message)]) == 1, "once per data set"
