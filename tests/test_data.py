import pytest
import torch

from ats_vit.data import DemoConfig, cluttered_digits, image_folder

SMALL = DemoConfig(
    canvas=32, digit=16, fragments=3, fragment=4, train_copies=1, test_copies=1, test_fraction=0.2, seed=3
)


def test_cluttered_digits_is_deterministic_and_well_formed():
    train_a, test_a = cluttered_digits(SMALL)
    train_b, test_b = cluttered_digits(SMALL)
    for a, b in ((train_a, train_b), (test_a, test_b)):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))
    images, labels = train_a.tensors
    assert images.shape[1:] == (1, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(labels.tolist()) == set(range(10))
    assert len(train_a) + len(test_a) == 1797  # every bundled digit, split once
    assert len(test_a) == round(0.2 * 1797)


def test_most_patches_are_background():
    _, test = cluttered_digits(SMALL)
    images = test.tensors[0]
    patches = images.unfold(2, 8, 8).unfold(3, 8, 8)  # (n, 1, 4, 4, 8, 8)
    empty = (patches.amax(dim=(-1, -2)) == 0).float().mean()
    assert empty > 0.3


def test_another_seed_gives_other_placements():
    a = cluttered_digits(SMALL)[1].tensors[0]
    b = cluttered_digits(DemoConfig(**{**SMALL.__dict__, "seed": 4}))[1].tensors[0]
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (DemoConfig(canvas=8, digit=16), "fragment <= digit <= canvas"),
        (DemoConfig(test_fraction=1.0), "test_fraction"),
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
