"""Architectures: sizes, output structure, prior order, preprocessing, ImageNet initialisation, model files."""

import re
import urllib.error

import pytest
import torch
import torchvision

from odkd.checkpoint import ModelFileError, atomic_save, load_model, save_model
from odkd.files import FileWriteError
from odkd.model_names import MODEL_NAMES, PRIOR_LAYOUT_NAMES
from odkd.models import MODELS, build_model, init_background_prior
from odkd.models.pretrained import IMAGENET_WEIGHTS
from odkd.models.vgg import L2Norm, reduced_fc_state_dict
from odkd.preprocessing import IMAGENET, Preprocessing
from odkd.priors import LAYOUTS, build_priors


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "params"),
    [("vgg16_ssd300", 26_285_486), ("mobilenetv2_ssdlite300", 3_388_228), ("mobilenetv2_ssdlite320", 3_388_228)],
)
def test_published_parameter_counts(name, params):
    assert n_params(build_model(name, num_classes=21)) == params


# name, image size, priors, source channels, source sizes, priors per cell, separable heads
ARCHS = {
    "vgg16_ssd300": (300, 8732, [512, 1024, 512, 256, 256, 256], [38, 19, 10, 5, 3, 1], [4, 6, 6, 6, 4, 4], False),
    "vgg16_lite300": (300, 3000, [1024, 512, 256, 256, 256, 256], [19, 10, 5, 3, 2, 1], [6] * 6, True),
    "mobilenetv2_ssdlite300": (300, 3000, [576, 1280, 512, 256, 256, 64], [19, 10, 5, 3, 2, 1], [6] * 6, True),
    "mobilenetv2_ssdlite320": (320, 3234, [576, 1280, 512, 256, 256, 64], [20, 10, 5, 3, 2, 1], [6] * 6, True),
}


def test_model_names_are_the_architectures_built():
    assert tuple(MODELS) == MODEL_NAMES == tuple(ARCHS)
    assert tuple(LAYOUTS) == PRIOR_LAYOUT_NAMES


@pytest.mark.parametrize("name", ARCHS)
def test_output_structure(name):
    size, num_priors, channels, sizes, anchors, separable = ARCHS[name]
    model = build_model(name, num_classes=5).eval()
    assert model.image_size == size
    torch.testing.assert_close(model.priors, build_priors(model.layout))
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.loc.shape == (2, num_priors, 4)
    assert out.conf.shape == (2, num_priors, 5)
    for k in range(6):
        hw = (sizes[k], sizes[k])
        assert out.features[k].shape == (2, channels[k], *hw)
        assert out.conf_maps[k].shape == (2, anchors[k] * 5, *hw)
        assert out.loc_maps[k].shape == (2, anchors[k] * 4, *hw)
        # Separable heads: the intermediate is the depthwise output (same shape as the source, other
        # values); plain heads and SSDLite's last 1x1 level: the intermediate is the source itself.
        assert out.conf_intermediates[k].shape == out.features[k].shape
        assert out.loc_intermediates[k].shape == out.features[k].shape
        plain = not separable or k == 5
        assert torch.equal(out.conf_intermediates[k], out.features[k]) == plain


def test_flattening_follows_prior_order():
    model = build_model("vgg16_ssd300", num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 300, 300))
    # Level 1 (19x19, 6 priors per cell) starts after 38*38*4 = 5776 priors; cell (row 2, col 3), prior 5.
    p = 5776 + (2 * 19 + 3) * 6 + 5
    for c in range(3):
        assert out.conf[0, p, c] == out.conf_maps[1][0, 5 * 3 + c, 2, 3]
    for j in range(4):
        assert out.loc[0, p, j] == out.loc_maps[1][0, 5 * 4 + j, 2, 3]


@pytest.mark.parametrize("name", ["vgg16_ssd300", "mobilenetv2_ssdlite300"])
def test_background_prior_is_the_starting_probability_of_every_prior(name):
    """With the class predictors' weights at 0 the scores are the softmax of the biases alone: p for the
    background, (1 - p) / 4 for each of the 4 classes, on every prior of every level (so the bias is laid out
    anchor-major, as the outputs are read). Float32: the softmax's exp, sum and division each round once
    (each exact to eps relative), so the scores hold to 8 eps relative."""
    model = build_model(name, num_classes=5).eval()
    init_background_prior(model, 0.99)
    with torch.no_grad():
        for head in model.conf_heads:
            head.predictor.weight.zero_()
        scores = model(torch.randn(1, 3, 300, 300)).conf.softmax(-1)
    expected = torch.tensor([0.99] + [0.01 / 4] * 4).expand_as(scores)
    torch.testing.assert_close(scores, expected, rtol=8 * torch.finfo(torch.float32).eps, atol=0)
    with pytest.raises(ValueError, match="in \\(0, 1\\), got 1"):
        init_background_prior(model, 1)


def test_wrong_input_size_is_reported():
    model = build_model("mobilenetv2_ssdlite300").eval()
    with pytest.raises(ValueError, match="feed 300x300 images"), torch.no_grad():
        model(torch.randn(1, 3, 320, 320))


def test_width_multiplier():
    base = build_model("mobilenetv2_ssdlite300")
    # Block 14's input is 96 w channels rounded to 8, expanded x6; the last conv 1280 channels, 1280 w above w = 1.
    for width, expansion, last in ((0.5, 288, 1280), (0.75, 432, 1280), (1.4, 816, 1792)):
        model = build_model("mobilenetv2_ssdlite300", width_mult=width).eval()
        assert model.backbone.out_channels == [expansion, last, 512, 256, 256, 64]
        assert (n_params(model) < n_params(base)) == (width < 1)
        with torch.no_grad():
            assert model(torch.randn(1, 3, 300, 300)).conf.shape == (1, 3000, 21)
    with pytest.raises(ValueError, match="no width multiplier"):
        build_model("vgg16_ssd300", width_mult=0.5)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet50_ssd")


def test_preprocessing_normalize():
    pixel = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    assert IMAGENET.normalize(pixel).abs().max() < 1e-5
    white = torch.full((1, 3, 1, 1), 255.0)
    expected = torch.tensor([(255 - 123.675) / 58.395, (255 - 116.28) / 57.12, (255 - 103.53) / 57.375])
    torch.testing.assert_close(IMAGENET.normalize(white).flatten(), expected)
    # qfgaohao: (x - 127) / 128; a BGR input is reordered to the RGB the weights expect.
    qf = Preprocessing(mean=(127, 127, 127), std=(128, 128, 128))
    bgr = torch.tensor([0.0, 127.0, 255.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(qf.normalize(bgr, channels="BGR").flatten(), torch.tensor([1.0, 0.0, -127 / 128]))
    with pytest.raises(ValueError):
        Preprocessing(mean=(0, 0, 0), std=(1, 0, 1))
    # A model normalises with its own tensors, kept in step with its preprocessing (also a BGR one).
    model = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.35)
    rgb = torch.tensor([255.0, 127.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(rgb), IMAGENET.normalize(rgb))
    model.preprocessing = Preprocessing(mean=(127, 127, 127), std=(128, 128, 128), channels="BGR")
    torch.testing.assert_close(model.normalize(rgb).flatten(), torch.tensor([-127 / 128, 0.0, 1.0]))
    assert "pixel_mean" not in model.state_dict()  # model files keep the preprocessing as numbers


def test_l2norm_by_hand_and_in_half_precision():
    layer = L2Norm(2)
    x = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(layer(x).flatten(), torch.tensor([12.0, 16.0]))  # 20 * (3, 4) / 5
    big = torch.full((1, 512, 2, 2), 1000.0, dtype=torch.float16)  # sum of squares 5.1e8 overflows fp16
    out = L2Norm(512)(big)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert out[0, 0, 0, 0].item() == pytest.approx(20 / 512**0.5, rel=1e-3)


@pytest.fixture(scope="module")
def random_vgg16_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg16-random.pth"
    torch.save(torchvision.models.vgg16().state_dict(), path)
    return path


def test_reduced_fc_conversion(random_vgg16_file):
    tv = torch.load(random_vgg16_file, weights_only=True)
    state = reduced_fc_state_dict(tv)
    fc6, fc7 = tv["classifier.0.weight"], tv["classifier.3.weight"]
    assert state["31.weight"].shape == (1024, 512, 3, 3)
    assert state["33.weight"].shape == (1024, 1024, 1, 1)
    # fc6 input index of (channel c, row r, col s) of the 7x7 pool5 grid is c*49 + r*7 + s;
    # conv6[o, c, i, j] takes fc6 unit 4*o at the tap (3i, 3j).
    for o, c, i, j in ((0, 0, 0, 0), (5, 17, 1, 2), (1023, 511, 2, 2), (300, 200, 2, 0)):
        assert state["31.weight"][o, c, i, j] == fc6[4 * o, c * 49 + 3 * i * 7 + 3 * j]
    assert state["31.bias"][7] == tv["classifier.0.bias"][28]
    for o, c in ((0, 0), (9, 1000), (1023, 1023)):
        assert state["33.weight"][o, c, 0, 0] == fc7[4 * o, 4 * c]
    assert torch.equal(state["28.weight"], tv["features.28.weight"])

    model = build_model("vgg16_ssd300", pretrained_backbone=random_vgg16_file)
    assert torch.equal(model.backbone.vgg[0].weight, tv["features.0.weight"])
    assert torch.equal(model.backbone.vgg[31].weight, state["31.weight"])
    assert torch.equal(model.backbone.vgg[33].bias, tv["classifier.3.bias"][::4])


def test_imagenet_weights_come_from_torchvision_cache(tmp_path, monkeypatch):
    # torchvision's weights API looks in $TORCH_HOME/hub/checkpoints before downloading.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = IMAGENET_WEIGHTS["mobilenet_v2"]
    cached = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    tv = torchvision.models.mobilenet_v2().state_dict()
    torch.save(tv, cached)
    model = build_model("mobilenetv2_ssdlite300", pretrained_backbone="imagenet")
    ours = model.backbone.features.state_dict()
    assert torch.equal(ours["0.0.weight"], tv["features.0.0.weight"])
    assert torch.equal(ours["14.conv.0.1.running_var"], tv["features.14.conv.0.1.running_var"])
    with pytest.raises(ValueError, match=r"width 1\.0 only"):
        build_model("mobilenetv2_ssdlite300", pretrained_backbone="imagenet", width_mult=0.5)


def test_offline_imagenet_error_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError) as err:
        build_model("vgg16_ssd300", pretrained_backbone="imagenet")
    message = str(err.value)
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        build_model("vgg16_ssd300", pretrained_backbone=tmp_path / "nowhere.pth")


def test_model_file_round_trip(tmp_path):
    model = build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.75).eval()
    model.preprocessing = Preprocessing(mean=(1, 2, 3), std=(4, 5, 6))
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt").eval()
    assert loaded.spec == {"name": "mobilenetv2_ssdlite300", "width_mult": 0.75, "num_classes": 6}
    assert loaded.preprocessing == model.preprocessing
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).conf, model(x).conf)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind

    torch.save({"vgg.0.weight": torch.zeros(1)}, tmp_path / "published.pth")
    with pytest.raises(ValueError, match=r"convert_checkpoint\.py"):
        load_model(tmp_path / "published.pth")
    (tmp_path / "broken.pt").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match=r"broken\.pt: not a PyTorch file that loads"):
        load_model(tmp_path / "broken.pt")


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    expected = rf"could not write {re.escape(str(path))}: boom .*the previous file is kept"
    with pytest.raises(FileWriteError, match=expected):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_class_names_and_label_names():
    model = build_model("mobilenetv2_ssdlite300", num_classes=4, width_mult=0.35)
    assert model.class_names is None and model.label_names == ["class1", "class2", "class3"]
    model.class_names = ["cat", "dog", "bird"]
    assert model.class_names == ("cat", "dog", "bird") and model.label_names == ["cat", "dog", "bird"]
    with pytest.raises(ValueError, match="3 object classes, got 2 names"):
        model.class_names = ["cat", "dog"]
