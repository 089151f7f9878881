"""Importing the published checkpoints: keys land in the right place and outputs equal the originals'."""

import pytest
import torch
from _reference_nets import QFGAOHAO, SSD_PYTORCH, qfgaohao_forward, random_state_dict, ssd_pytorch_forward

from odkd.checkpoint import init_from_checkpoint, load_model
from odkd.convert import import_checkpoint
from odkd.models import build_model


@pytest.fixture(scope="module")
def ssd_pytorch_state():
    return random_state_dict(SSD_PYTORCH, seed=1)


@pytest.fixture(scope="module")
def qfgaohao_state():
    return random_state_dict(QFGAOHAO, seed=2)


def test_ssd_pytorch_tensors_land_in_place(ssd_pytorch_state):
    sd = ssd_pytorch_state
    model = import_checkpoint(sd, "ssd.pytorch")
    assert model.arch == "vgg16_ssd300" and model.num_classes == 21
    ours = model.state_dict()
    assert len(ours) == len(sd)  # every key consumed, every model key filled
    assert torch.equal(ours["backbone.vgg.0.weight"], sd["vgg.0.weight"])
    assert torch.equal(ours["backbone.vgg.31.weight"], sd["vgg.31.weight"])  # fc6
    assert torch.equal(ours["backbone.l2norm.weight"], sd["L2Norm.weight"])
    assert torch.equal(ours["backbone.extras.1.2.weight"], sd["extras.3.weight"])
    for k in range(6):
        assert torch.equal(ours[f"loc_heads.{k}.predictor.weight"], sd[f"loc.{k}.weight"])
        assert torch.equal(ours[f"conf_heads.{k}.predictor.bias"], sd[f"conf.{k}.bias"])
    assert model.preprocessing.mean == (123.0, 117.0, 104.0) and model.preprocessing.std == (1.0, 1.0, 1.0)


def test_qfgaohao_tensors_land_in_place(qfgaohao_state):
    sd = qfgaohao_state
    model = import_checkpoint(sd, "qfgaohao")
    assert model.arch == "mobilenetv2_ssdlite300" and model.num_classes == 21
    ours = model.state_dict()
    assert len(ours) == len(sd)
    assert torch.equal(ours["backbone.features.0.0.weight"], sd["base_net.0.0.weight"])
    assert torch.equal(ours["backbone.features.1.conv.2.running_var"], sd["base_net.1.conv.4.running_var"])
    assert torch.equal(ours["backbone.features.14.conv.1.1.running_var"], sd["base_net.14.conv.4.running_var"])
    assert torch.equal(ours["backbone.features.18.1.running_mean"], sd["base_net.18.1.running_mean"])
    assert torch.equal(ours["backbone.extras.3.conv.2.weight"], sd["extras.3.conv.6.weight"])
    for k in range(5):
        assert torch.equal(ours[f"conf_heads.{k}.intermediate.0.bias"], sd[f"classification_headers.{k}.0.bias"])
        assert torch.equal(ours[f"loc_heads.{k}.predictor.weight"], sd[f"regression_headers.{k}.3.weight"])
    assert torch.equal(ours["conf_heads.5.predictor.weight"], sd["classification_headers.5.weight"])
    assert model.preprocessing.mean == (127.0,) * 3 and model.preprocessing.std == (128.0,) * 3


@pytest.mark.parametrize(
    ("source", "layout", "forward"),
    [("ssd.pytorch", SSD_PYTORCH, ssd_pytorch_forward), ("qfgaohao", QFGAOHAO, qfgaohao_forward)],
)
def test_imported_model_computes_the_original_outputs(source, layout, forward):
    sd = random_state_dict(layout, seed=3)
    model = import_checkpoint(sd, source).eval()
    x = torch.randn(2, 3, 300, 300, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        loc_ref, conf_ref = forward(sd, x)
    assert out.loc.shape == loc_ref.shape and out.conf.shape == conf_ref.shape
    assert out.loc.shape[1] == layout["num_priors"]
    torch.testing.assert_close(out.loc, loc_ref, rtol=1e-4, atol=1e-4 * loc_ref.abs().max().item())
    torch.testing.assert_close(out.conf, conf_ref, rtol=1e-4, atol=1e-4 * conf_ref.abs().max().item())


def test_checkpoints_without_batchnorm_step_counts_import(qfgaohao_state):
    """Checkpoints saved by PyTorch before 0.4.1 hold no num_batches_tracked: they import and compute the same."""
    old = {k: v for k, v in qfgaohao_state.items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(qfgaohao_state)
    x = torch.randn(2, 3, 300, 300, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = import_checkpoint(old, "qfgaohao").eval()(x)
        expected = import_checkpoint(qfgaohao_state, "qfgaohao").eval()(x)
    assert torch.equal(got.loc, expected.loc) and torch.equal(got.conf, expected.conf)


def test_wrapped_and_dataparallel_checkpoints_import(qfgaohao_state):
    wrapped = {"state_dict": {f"module.{k}": v for k, v in qfgaohao_state.items()}}
    model = import_checkpoint(wrapped, "qfgaohao")
    assert torch.equal(model.state_dict()["backbone.features.0.0.weight"], qfgaohao_state["base_net.0.0.weight"])


def test_bad_checkpoints_are_reported(ssd_pytorch_state):
    sd = dict(ssd_pytorch_state)
    del sd["extras.5.bias"]
    sd["extras.8.weight"] = torch.zeros(3)
    sd["loc.2.weight"] = torch.zeros(24, 512, 1, 1)
    with pytest.raises(ValueError) as err:
        import_checkpoint(sd, "ssd.pytorch")
    message = str(err.value)
    assert "unexpected keys: extras.8.weight" in message
    assert "missing model keys: backbone.extras.2.2.bias" in message
    assert "loc.2.weight (24, 512, 1, 1)" in message and "(24, 512, 3, 3)" in message
    with pytest.raises(ValueError, match="not a qfgaohao checkpoint"):
        import_checkpoint(ssd_pytorch_state, "qfgaohao")
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        import_checkpoint(ssd_pytorch_state, "mmdet")


def test_load_model_reads_published_checkpoints(tmp_path, qfgaohao_state):
    """One entry point for weights in a file: a published checkpoint through load_model, which fine-tuning
    (init_from_checkpoint) and teachers use too; a problem names the file."""
    path = tmp_path / "mb2-ssd-lite-mp-0_686.pth"
    torch.save(qfgaohao_state, path)
    model = load_model(path, "qfgaohao")
    expected = import_checkpoint(qfgaohao_state, "qfgaohao")
    assert model.arch == expected.arch and model.preprocessing == expected.preprocessing
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in model.state_dict().items())
    fresh = build_model("mobilenetv2_ssdlite300", num_classes=model.num_classes)
    assert init_from_checkpoint(fresh, path, "qfgaohao") == (len(fresh.state_dict()), 0)
    with pytest.raises(ValueError, match=r"mb2-ssd-lite-mp-0_686\.pth: not a ssd\.pytorch checkpoint"):
        load_model(path, "ssd.pytorch")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: not a state dict but a list"):
        load_model(tmp_path / "list.pth", "qfgaohao")


def test_convert_script_writes_a_loadable_model(tmp_path, qfgaohao_state, run_script):
    src = tmp_path / "mb2-ssd-lite-mp-0_686.pth"
    torch.save(qfgaohao_state, src)
    out = tmp_path / "student.pt"
    result = run_script("convert_checkpoint.py", "--source", "qfgaohao", "--input", src, "--output", out)
    assert result.returncode == 0, result.stderr
    model = load_model(out)
    assert model.arch == "mobilenetv2_ssdlite300"
    assert model.preprocessing.std == (128.0,) * 3
    assert torch.equal(model.state_dict()["loc_heads.5.predictor.bias"], qfgaohao_state["regression_headers.5.bias"])

    result = run_script("convert_checkpoint.py", "--source", "ssd.pytorch", "--input", src, "--output", out)
    assert result.returncode != 0 and "not a ssd.pytorch checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
