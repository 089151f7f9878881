"""Config files: validation with clear errors, overrides, round trip, lr scaling."""

import pytest

from odkd.config import ConfigError, evaluation_config, load_config, save_config, scaled_lr
from odkd.postprocess_settings import PostprocessSettings


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: vgg16_lite300}\noptim: {lr: 0.002, milestones: [10, 20]}\ndata: {classes: voc}\n")
    cfg = load_config(path, ["optim.max_iters=30", "data.batch_size=8", "train.ema_decay=0.999", "optim.lr=1"])
    assert cfg.model.name == "vgg16_lite300"
    assert cfg.optim.milestones == [10, 20] and cfg.optim.max_iters == 30
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # an int where a float is expected
    assert cfg.train.ema_decay == 0.999 and cfg.data.batch_size == 8
    assert cfg.num_classes == 21 and cfg.class_names[0] == "aeroplane"
    assert load_config(None, ["data.classes=[cat, dog]"]).class_names == ("cat", "dog")
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 0.001  # YAML 1.1 reads 1e-3 as a string


def test_saved_config_loads_back_identical(tmp_path):
    cfg = load_config(None, ["optim.schedule=cosine", "model.pretrained_backbone=imagenet", "data.classes=[a, b]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown key optim.lrr"),
        ("trian.seed=1", "unknown key trian"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("train.amp=3", "train.amp: expected bool"),
        ("data.batch_size=true", "data.batch_size: expected int"),
        ("eval.metric=map", r"eval.metric: must be one of \[.voc07., .area., .coco.\]"),
        ("train.compile_mode=fast", r"train.compile_mode: must be one of \[.default., .reduce-overhead., "),
        ("optim.milestones=[5, x]", r"optim.milestones\[1\]: expected int"),
        ("model.name=resnet", "model.name: unknown model 'resnet'"),
        ("data.classes=cityscapes", "data.classes: .cityscapes. is neither"),
        ("optim.milestones=[20, 10]", "optim.milestones must increase"),
        ("train.keep_last=0", "train.keep_last must be at least 1"),  # [:-0] would have kept every checkpoint
        ("train.eval_every=0", "train.eval_every must be at least 1"),
        ("optim", "must look like section.key=value"),
        ("distill.methods=[fgd, fgd]", r"distill.methods: name one or more distinct methods"),
        ("distill.methods=[]", r"distill.methods: name one or more distinct methods"),
        ("distill.mu=0.5", r"unknown key distill.mu; valid keys of distill: \[.*'methods'"),
        ("model.dfl_bins=1", "model.dfl_bins: 0"),
        ("data.ignore_classes=[triangle, hexagon]", r"data.ignore_classes: \['triangle'\] are also in data.classes"),
        ("data.format=coco", "data.format coco needs data.coco.train_json"),
        ("data.augment.flip_p=1.5", r"data.augment.flip_p is a probability, got 1.5"),
        ("data.augment.contrast=[1.5, 0.5]", r"data.augment.contrast is \[low, high\] with 0 < low <= high"),
        ("data.augment.crop_aspect=[0.5]", r"data.augment.crop_aspect is \[low, high\]"),
        ("data.augment.hue=270", "data.augment.hue is 0-180 degrees"),
        ("data.augment.expand_max_ratio=0.5", "data.augment.expand_max_ratio is at least 1"),
        ("data.augment.min_crop_scale=0", r"data.augment.min_crop_scale is in \(0, 1\]"),
        ("data.augment.min_ious=[0.5, 2]", r"data.augment.min_ious are IoUs in \[0, 1\]"),
        ("data.augment.swap_p=0", r"unknown key data.augment.swap_p; valid keys of data.augment: \[.*'channel_swap_p'"),
        # class lists: each name is one output of the head
        ("data.classes=[cat, dog, cat]", r"data.classes: \['cat'\] appear more than once"),
        ("data.classes=[]", "data.classes: the list is empty: name at least one class"),
        ("data.classes=[cat, ' ']", r"data.classes: \[' '\] are blank names"),
        # counts, sizes and probabilities out of range, each named
        ("data.batch_size=1", r"data.batch_size must be at least 2 \(BatchNorm needs two images per process"),
        ("data.num_workers=-1", "data.num_workers must be at least 0, got -1"),
        ("data.synthetic_sizes={trainval: 0, test: 2}", "data.synthetic_sizes.trainval must be at least 1, got 0"),
        ("data.synthetic_scale=0", "data.synthetic_scale must be positive, got 0.0"),
        ("data.synthetic_objects=[0, 3]", r"data.synthetic_objects\[0\] must be at least 1, got 0"),
        ("data.synthetic_objects=[5, 3]", r"data.synthetic_objects must be \[min, max\] with min <= max, got \[5, 3\]"),
        ("data.synthetic_objects=[3]", r"data.synthetic_objects must be \[min, max\] with min <= max, got \[3\]"),
        ("data.synthetic_max_overlap=0", r"data.synthetic_max_overlap must be in \(0, 1\], got 0.0"),
        ("eval.batch_size=0", "eval.batch_size must be at least 1, got 0"),
        ("eval.nms_threshold=0", r"eval.nms_threshold must be in \(0, 1\], got 0.0"),
        ("eval.score_threshold=1", r"eval.score_threshold must be in \[0, 1\), got 1.0"),
        ("eval.top_k=0", "eval.top_k must be at least 1, got 0"),
        ("eval.max_detections=0", "eval.max_detections must be at least 1, got 0"),
        ("optim.warmup_iters=-1", "optim.warmup_iters must be at least 0, got -1"),
        ("optim.warmup_factor=0", r"optim.warmup_factor must be in \(0, 1\], got 0.0"),
        ("optim.momentum=1", r"optim.momentum must be in \[0, 1\), got 1.0"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay must be at least 0, got -0.0001"),
        ("optim.grad_clip=0", "optim.grad_clip must be positive, got 0.0"),
        ("optim.gamma=0", "optim.gamma must be positive, got 0.0"),
        ("optim.milestones=[0, 10]", r"optim.milestones\[0\] must be at least 1, got 0"),
        ("optim.reference_batch_size=0", "optim.reference_batch_size must be at least 1, got 0"),
        ("loss.neg_pos_ratio=0", "loss.neg_pos_ratio must be positive, got 0.0"),
        ("loss.iou_threshold=1.5", r"loss.iou_threshold must be in \(0, 1\], got 1.5"),
        ("train.ema_decay=1", r"train.ema_decay must be in \(0, 1\), got 1.0"),
        ("train.seed=-1", r"train.seed must be in \[0, 2\*\*32\), got -1"),
        ("model.width_mult=0", "model.width_mult must be positive, got 0.0"),
        ("model.background_prior=1", r"model.background_prior must be in \(0, 1\), got 1.0"),
        ("distill.balance_fraction=0", "distill.balance_fraction must be positive, got 0.0"),
    ],
)
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_every_range_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.batch_size=1", "eval.batch_size=0", "data.num_workers=-1", "optim.momentum=-0.5"])
    message = str(err.value)
    for key in ("data.batch_size", "eval.batch_size", "data.num_workers", "optim.momentum"):
        assert f"{key} must be" in message


def test_ignore_classes_is_for_voc_data():
    assert load_config(None, ["data.classes=voc", "data.ignore_classes=[gnu]"]).data.ignore_classes == ["gnu"]
    coco = ["data.format=coco", "data.coco.train_json=t.json", "data.coco.train_images=t", "data.ignore_classes=[a]"]
    with pytest.raises(ConfigError, match=r"data\.ignore_classes is for VOC data"):
        load_config(None, coco)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, r"run\.yaml does not exist"),
        ({"run.yaml": "- 1\n- 2\n"}, r"run\.yaml: a config is a mapping"),
        ({"run.yaml": "model: [\n"}, "not valid YAML"),
        ({"run.yaml": "base: b.yaml\n", "b.yaml": "base: run.yaml\n"}, "cycle"),
        ({"run.yaml": "base: nowhere.yaml\n"}, r"nowhere\.yaml does not exist"),
        ({"run.yaml": "base: [a.yaml]\n"}, "base must be the path"),
    ],
)
def test_bad_files(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "run.yaml")


def test_linear_lr_scaling():
    cfg = load_config(None, ["optim.lr=0.001", "optim.reference_batch_size=32", "data.batch_size=64"])
    assert scaled_lr(cfg) == pytest.approx(0.002)  # 0.001 * 64 / 32
    assert scaled_lr(cfg, world_size=4) == pytest.approx(0.008)  # 0.001 * 64*4 / 32


def test_base_files_merge_section_by_section(tmp_path):
    (tmp_path / "common.yaml").write_text(
        "model: {name: vgg16_lite300, width_mult: 1.0}\noptim: {lr: 0.002, milestones: [10, 20]}\n"
        "distill: {methods: [chen2017], chen2017: {mu: 0.7, gamma: 0.1}}\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(
        "base: ../common.yaml\noptim: {lr: 0.01}\ndistill: {methods: [chen2017, fgd], chen2017: {mu: 0.9}}\n"
    )
    cfg = load_config(tmp_path / "sub" / "child.yaml", ["distill.fgd.alpha=0.5"])
    assert cfg.model.name == "vgg16_lite300" and cfg.optim.milestones == [10, 20] and cfg.optim.lr == 0.01
    assert cfg.distill.methods == ["chen2017", "fgd"]
    assert cfg.distill.settings == {"chen2017": {"mu": 0.9, "gamma": 0.1}, "fgd": {"alpha": 0.5}}  # key by key
    saved = tmp_path / "saved.yaml"
    save_config(cfg, saved)  # written back as the sections a user writes
    assert "chen2017:" in saved.read_text() and "settings" not in saved.read_text() and load_config(saved) == cfg


def test_a_config_trains_alone_unless_it_has_a_distill_section():
    assert load_config(None).distill is None
    assert load_config(None, ["distill.methods=[hinton]"]).distill.methods == ["hinton"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.methods=[chen2017, kd]", r"distill.methods: unknown method 'kd'; known: chen2017, crosskd"),
        ("distill.fgd.alpah=1", r"unknown setting distill.fgd.alpah; fgd's settings: \['alpha', 'beta'"),
        ("distill.fgd.alpha=much", "distill.fgd.alpha: expected float, got 'much'"),
        ("distill.crosskd.align=loose", r"distill.crosskd.align: must be one of \['standardize', 'adapter'\]"),
        ("distill.chen217.mu=0.5", "distill.chen217: no distillation method of that name; known: chen2017"),
        # each distiller's declared ranges, and settings that do not fit together
        ("distill.chen2017.temperature=0", "distill.chen2017.temperature must be positive, got 0.0"),
        ("distill.chen2017.mu=1.5", r"distill.chen2017.mu must be in \[0, 1\], got 1.5"),
        ("distill.fgd.levels=[-1]", r"distill.fgd.levels\[0\] must be at least 0, got -1"),
        ("distill.chen2017.mu_end=0.5", "distill.chen2017: a mu schedule needs both mu_end and mu_ramp_iters > 0"),
    ],
)
def test_method_settings_are_checked_against_their_class_when_the_run_is_built(override, message):
    """The config knows no method (a method of your own registers itself); the run's build checks each
    section against the class's keyword arguments, before anything trains."""
    from odkd.distill import build_distillers
    from odkd.models import build_model

    cfg = load_config(None, ["distill.methods=[chen2017, fgd, crosskd]", override])
    student = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5)
    with pytest.raises(ConfigError, match=message):
        build_distillers(cfg.distill, student, student)


def test_evaluation_config_from_arguments_and_files(tmp_path):
    """evaluate.py's arguments on top of a config file, or alone: nothing about the data is assumed."""
    from odkd.class_names import VOC_CLASSES

    cfg = evaluation_config(voc_root=tmp_path, year="2007", image_set="test")
    assert (cfg.data.format, cfg.data.voc_root, cfg.data.test_sets) == ("voc", str(tmp_path), "2007_test")
    assert cfg.class_names == VOC_CLASSES and cfg.eval.metric == "voc07"
    assert cfg.eval.postprocess == PostprocessSettings()  # the defaults' one home
    for missing, message in (
        ({"year": "2007", "image_set": "test"}, "needs voc_root"),
        ({"voc_root": tmp_path, "year": "2007"}, "give year and image_set"),
        ({"voc_root": tmp_path, "year": "2007", "image_set": "test", "metric": "coco"}, "eval.metric coco"),
    ):
        with pytest.raises(ConfigError, match=message):
            evaluation_config(**missing)

    path = tmp_path / "run.yaml"
    path.write_text("data: {voc_root: voc, test_sets: SYN_test, classes: synthetic}\neval: {metric: area, top_k: 50}\n")
    cfg = evaluation_config(path, classes=["disc", "ring"])
    assert (cfg.data.voc_root, cfg.data.test_sets, cfg.class_names) == ("voc", "SYN_test", ("disc", "ring"))
    assert cfg.eval.metric == "area" and cfg.eval.postprocess == PostprocessSettings(top_k=50)
    assert evaluation_config(path, year="2012", image_set="val", metric="voc07").data.test_sets == "2012_val"
    with pytest.raises(ConfigError, match=r"are also in data\.classes"):
        evaluation_config(path, ignore_classes=["disc"])

    coco_json = tmp_path / "coco" / "val.json"
    coco_json.parent.mkdir()
    coco_json.write_text(
        '{"images": [], "annotations": [], "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}]}'
    )
    cfg = evaluation_config(coco_json=coco_json)
    assert cfg.data.format == "coco" and cfg.eval.metric == "coco" and cfg.class_names == ("dog", "cat")
    assert cfg.data.coco.test_images == str(coco_json.parent)  # scoring a results file reads no image
    with pytest.raises(ConfigError, match="running a model on COCO data needs coco_images"):
        evaluation_config(coco_json=coco_json, reads_images=True)
    with pytest.raises(ConfigError, match="ignore_classes is for VOC data"):
        evaluation_config(coco_json=coco_json, ignore_classes=["cat"])
