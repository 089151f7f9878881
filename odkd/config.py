"""Run configuration: YAML files validated into typed dataclasses.

A config file holds any subset of the sections below, optionally on top of another file it names as
``base: other.yaml`` (relative to itself; sections merge key by key). Every key is checked against the
dataclass fields (unknown keys and wrong types are errors that name the dotted key), and command-line
overrides ``key.sub=value`` (values parsed as YAML) apply on top::

    cfg = load_config("configs/demo_teacher_synthetic.yaml", ["optim.max_iters=200", "data.batch_size=8"])
    save_config(cfg, "runs/x/config.yaml")   # the resolved config goes with every run

Learning-rate scaling rule: the recipes give ``optim.lr`` for ``optim.reference_batch_size`` images per
step; with another total batch (batch_size x GPUs) the lr is scaled linearly, and warm-up keeps the
first iterations stable (see :func:`scaled_lr`).

A config is plain data: this module and what it checks against (the class lists, the augmentation
settings, the model names) import neither torch nor OpenCV.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from odkd.augmentation import Augmentation
from odkd.class_names import CLASS_LISTS, class_name_problems
from odkd.model_names import MODEL_NAMES
from odkd.postprocess_settings import PostprocessSettings

__all__ = [
    "Config",
    "ConfigError",
    "check_value",
    "config_to_dict",
    "evaluation_config",
    "load_config",
    "range_problems",
    "save_config",
    "scaled_lr",
]


class ConfigError(ValueError):
    """A config problem; the message names the file and the key."""


@dataclass
class ModelConfig:
    name: str = "mobilenetv2_ssdlite300"  # one of odkd.model_names.MODEL_NAMES
    width_mult: float = 1.0  # MobileNetV2 only
    pretrained_backbone: str | None = None  # "imagenet", a path to torchvision weights, or none
    init_checkpoint: str | None = None  # start from these weights (odkd model/training file)
    init_source: Literal["odkd", "ssd.pytorch", "qfgaohao"] = "odkd"  # format of init_checkpoint
    dfl_bins: int = 0  # > 0: distribution (DFL) box head, this many bin intervals per edge (GFL: 16); for ld
    # The probability of background the class heads start with (e.g. 0.99; odkd.models.init_background_prior);
    # none: zero bias, every class 1/C at the start, as SSD.
    background_prior: float | None = None


@dataclass
class COCOFiles:
    """A COCO-format dataset: annotation JSON files and the folders their images' file_name are relative to."""

    train_json: str | None = None
    train_images: str | None = None
    test_json: str | None = None
    test_images: str | None = None


@dataclass
class DataConfig:
    format: Literal["voc", "coco"] = "voc"  # VOC layout (voc_root, *_sets) or COCO JSON (the coco section)
    voc_root: str = "data/synthetic"  # folder that contains VOC<year>/
    train_sets: str = "SYN_trainval"  # e.g. 2007_trainval+2012_trainval
    test_sets: str = "SYN_test"  # e.g. 2007_test
    coco: COCOFiles = field(default_factory=COCOFiles)
    # "voc", "coco" (the 80 COCO classes), "synthetic", "dataset" (COCO: the train file's categories), or names
    classes: str | list[str] = "synthetic"
    # VOC: object names left out as background (train on a class subset); null = the VOC classes not in classes
    ignore_classes: list[str] | None = None
    synthetic: bool = False  # create the synthetic dataset (VOC: at voc_root; COCO: the parent of coco.train_images)
    synthetic_sizes: dict[str, int] = field(default_factory=lambda: {"trainval": 400, "test": 100})
    synthetic_scale: float = 1.0  # multiplies the synthetic objects' sizes (capped at the image)
    # What a synthetic image holds (odkd.data.synthetic.SyntheticLayout): (min, max) objects, the largest
    # share of an object's box another may cover (1: any), random lines on the background, a colour per class
    # (false: random colours, the shape alone tells the class).
    synthetic_objects: list[int] = field(default_factory=lambda: [1, 4])
    synthetic_max_overlap: float = 1.0
    synthetic_lines: bool = True
    synthetic_class_colours: bool = True
    keep_difficult: bool = False  # keep difficult objects in the training targets
    skip_invalid: bool = False  # skip images with bad data (warning each) instead of stopping; reads each once at start
    batch_size: int = 32  # per process
    num_workers: int = 4
    cache_dir: str | None = None  # decode the train images once into a file here (VOC07+12: ~9 GB) and read that
    # GT slots per image of a training batch: "batch" = its most crowded image's objects; "dataset" = the train
    # set's most crowded image, one shape for every batch (what CUDA graphs replay; more matching work);
    # "auto" = "dataset" exactly when train.compile_mode records CUDA graphs
    gt_padding: Literal["auto", "batch", "dataset"] = "auto"
    augment: Augmentation = field(default_factory=Augmentation)  # the train augmentation, SSD's by default


@dataclass
class LossConfig:
    neg_pos_ratio: float = 3.0
    iou_threshold: float = 0.5
    dfl_weight: float = 0.25  # distribution focal loss weight (distribution box heads only; GFL's 0.25)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # adamw: momentum is its beta1, weight_decay its decoupled decay
    lr: float = 1e-3  # for reference_batch_size images per step
    reference_batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_iters: int = 120_000
    schedule: Literal["multistep", "cosine"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [80_000, 100_000])
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3
    grad_clip: float | None = None  # max gradient norm


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    seed: int = 0
    amp: bool = True  # bf16 where supported, else fp16 + GradScaler (CUDA only)
    channels_last: bool = True  # NHWC memory format: cuDNN kernels on CUDA, oneDNN on the CPU
    compile: bool = False  # torch.compile the training step
    # torch.compile's mode; "reduce-overhead" and "max-autotune" replay the step as CUDA graphs
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    ema_decay: float | None = None  # keep an EMA of the weights (e.g. 0.9998) and evaluate it
    log_every: int = 20
    eval_every: int = 5000
    checkpoint_every: int = 5000
    keep_last: int = 3  # training checkpoints kept besides best.pt
    max_bad_steps: int = 10  # consecutive NaN/inf losses before the run stops


@dataclass
class EvalConfig:
    """How a test set is evaluated; the post-processing settings and their defaults are
    :class:`~odkd.postprocess.PostprocessSettings`' (the box coding is the model's, not a setting here)."""

    metric: Literal["voc07", "area", "coco"] = "voc07"  # coco: pycocotools AP@[.5:.95] (COCO-format data)
    batch_size: int = 32
    score_threshold: float = PostprocessSettings.score_threshold
    nms_threshold: float = PostprocessSettings.nms_threshold
    top_k: int = PostprocessSettings.top_k
    max_detections: int = PostprocessSettings.max_detections

    @property
    def postprocess(self) -> PostprocessSettings:
        """These settings as :class:`~odkd.postprocess.PostprocessSettings`."""
        return PostprocessSettings(
            score_threshold=self.score_threshold,
            top_k=self.top_k,
            nms_threshold=self.nms_threshold,
            max_detections=self.max_detections,
        )


@dataclass
class DistillConfig:
    """A distillation run (``scripts/distill.py``): the teacher and the methods. ``methods`` names registered
    distillers (:data:`odkd.distill.DISTILLERS`); each may have a section ``distill.<name>`` of settings (the
    keyword arguments of its class, checked against it when the run is built; unset ones keep its defaults).
    Sections of methods not in ``methods`` are kept but unused."""

    teacher: str | None = None  # teacher weights (distill.py --teacher overrides)
    teacher_source: Literal["odkd", "ssd.pytorch", "qfgaohao"] = "odkd"  # format of the teacher file
    prior_mapping: Literal["none", "iou"] = "none"  # "iou": re-map a teacher of another prior layout
    methods: list[str] = field(default_factory=list)  # e.g. [chen2017, fgd]
    # At the first step, scale each method's terms so that their gradient norm (w.r.t. the student's
    # weights) is balance_fraction x the detection loss's; the scales are logged and checkpointed.
    auto_balance: bool = False
    balance_fraction: float = 1.0
    # distill.<method>: {setting: value}; in YAML these are the section's other keys (see _distill_sections)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig | None = None  # a distillation run; absent: the model trains on the data alone

    @property
    def class_names(self) -> tuple[str, ...]:
        classes = self.data.classes
        if classes == "dataset":
            from odkd.data.coco import coco_class_names

            return coco_class_names(self.data.coco.train_json)
        return tuple(CLASS_LISTS[classes]) if isinstance(classes, str) else tuple(classes)

    @property
    def num_classes(self) -> int:
        """Including background."""
        return len(self.class_names) + 1


def check_value(value: Any, annotation: Any, key: str) -> Any:
    """``value`` converted to ``annotation`` (dataclass, scalar, list, dict, Literal, Optional); a
    :class:`ConfigError` naming the dotted ``key`` when it does not fit. Also checks the settings of
    distillers (``odkd.distill``) against the annotations of their keyword arguments."""
    if annotation is Any:  # checked later, by what reads it (a distiller's settings)
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(annotation, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {annotation}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {check_value(k, args[0], key): check_value(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, annotation) or (annotation is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    if cls is DistillConfig:
        values = _distill_sections(values)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        section = f" of {prefix}" if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys{section}: {sorted(names)}")
    return cls(**{k: check_value(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()})


def _distill_sections(values: dict) -> dict:
    """The distill section as written (``distill.<method>: {settings}`` beside its own keys) -> the fields of
    :class:`DistillConfig` (those sections under ``settings``). A key that is neither a field nor a mapping
    stays, to be reported as unknown."""
    names = {f.name for f in dataclasses.fields(DistillConfig)}
    sections = {k: v for k, v in values.items() if k not in names and isinstance(v, dict)}
    if not sections:
        return values
    rest = {k: v for k, v in values.items() if k not in sections}
    return {**rest, "settings": {**rest.get("settings", {}), **sections}}


def config_to_dict(cfg: Config) -> dict:
    """The config as the YAML a user writes: method settings as ``distill.<method>`` sections."""
    tree = dataclasses.asdict(cfg)
    if tree["distill"] is not None:
        tree["distill"].update(tree["distill"].pop("settings"))
    return tree


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[last] = value


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The settings of the YAML file at ``path``, on top of its ``base:`` file (a path relative to it)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base files form a cycle: {' -> '.join(map(str, (*seen, path.resolve())))}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be the path of another config file, got {base!r}")
    return _merge(_read_tree(path.parent / base, (*seen, path.resolve())), tree)


def _merge(base: dict, update: dict) -> dict:
    """``update`` on top of ``base``, section by section (values and lists are replaced whole)."""
    merged = dict(base)
    for key, value in update.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- the YAML file at ``path`` (on top of its ``base:`` file, if it names one) <- ``overrides``
    (``"a.b=value"``), validated."""
    tree: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        tree = _read_tree(Path(path))
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(text))
    try:
        cfg = _build(Config, tree)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None
    _validate(cfg, source)
    return cfg


# Ranges the types cannot express: dotted key -> (test, what the value must be). Lists and mappings are
# checked item by item; None (an optional setting left unset) passes. A distiller's settings are checked
# against the ranges it declares (odkd.distill.base.Distiller.ranges) when the distiller is built.
Range = tuple[Callable[[Any], bool], str]
POSITIVE: Range = (lambda v: v > 0, "positive")
NOT_NEGATIVE: Range = (lambda v: v >= 0, "at least 0")
COUNT: Range = (lambda v: v >= 1, "at least 1")
PROBABILITY: Range = (lambda v: 0 <= v <= 1, "in [0, 1]")
FRACTION: Range = (lambda v: 0 <= v < 1, "in [0, 1)")
IOU: Range = (lambda v: 0 < v <= 1, "in (0, 1]")
OPEN_UNIT: Range = (lambda v: 0 < v < 1, "in (0, 1)")
_RANGES: dict[str, Range] = {
    "model.width_mult": POSITIVE,
    "model.background_prior": OPEN_UNIT,
    "data.synthetic_sizes": COUNT,
    "data.synthetic_scale": POSITIVE,
    "data.synthetic_objects": COUNT,
    "data.synthetic_max_overlap": IOU,
    "data.batch_size": (lambda v: v >= 2, "at least 2 (BatchNorm needs two images per process in training)"),
    "data.num_workers": NOT_NEGATIVE,
    "loss.neg_pos_ratio": POSITIVE,
    "loss.iou_threshold": IOU,
    "loss.dfl_weight": NOT_NEGATIVE,
    "optim.lr": POSITIVE,
    "optim.reference_batch_size": COUNT,
    "optim.momentum": FRACTION,
    "optim.weight_decay": NOT_NEGATIVE,
    "optim.max_iters": COUNT,
    "optim.milestones": COUNT,
    "optim.gamma": POSITIVE,
    "optim.warmup_iters": NOT_NEGATIVE,
    "optim.warmup_factor": IOU,
    "optim.grad_clip": POSITIVE,
    "train.seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "train.ema_decay": OPEN_UNIT,
    **dict.fromkeys(
        ("train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_last", "train.max_bad_steps"),
        COUNT,
    ),
    "eval.batch_size": COUNT,
    "eval.score_threshold": FRACTION,
    "eval.nms_threshold": IOU,
    "eval.top_k": COUNT,
    "eval.max_detections": COUNT,
    "distill.balance_fraction": POSITIVE,
}


def range_problems(key: str, value: Any, limit: Range) -> list[str]:
    """What is wrong with setting ``key`` = ``value`` against ``limit`` (lists and mappings item by item;
    None passes), each problem naming its dotted key; empty when all is well."""
    test, requirement = limit
    if isinstance(value, dict):
        items = [(f"{key}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    else:
        items = [(key, value)]
    return [f"{name} must be {requirement}, got {v!r}" for name, v in items if v is not None and not test(v)]


def _range_problems(cfg: Config) -> list[str]:
    """The settings of ``cfg`` outside their :data:`_RANGES`."""
    problems = []
    for key, limit in _RANGES.items():
        if getattr(cfg, key.partition(".")[0]) is not None:  # an optional section (distill) may be left out
            problems += range_problems(key, functools.reduce(getattr, key.split("."), cfg), limit)
    return problems


def _validate(cfg: Config, source: str) -> None:
    """Cross-field checks the types cannot express."""
    problems = []
    if cfg.model.name not in MODEL_NAMES:
        problems.append(f"model.name: unknown model {cfg.model.name!r}; known: {sorted(MODEL_NAMES)}")
    data = cfg.data
    if isinstance(data.classes, str) and data.classes not in (*CLASS_LISTS, "dataset"):
        problems.append(f"data.classes: {data.classes!r} is neither {[*CLASS_LISTS, 'dataset']} nor a list of names")
    elif isinstance(data.classes, list):
        problems += [f"data.classes: {problem}" for problem in class_name_problems(data.classes)]
    coco = data.coco
    if data.format == "coco" and not (coco.train_json and coco.train_images):
        problems.append("data.format coco needs data.coco.train_json and data.coco.train_images")
    if bool(coco.test_json) != bool(coco.test_images):
        problems.append("data.coco.test_json and data.coco.test_images go together")
    if data.ignore_classes is not None and data.format != "voc":
        problems.append("data.ignore_classes is for VOC data (COCO leaves out categories outside data.classes)")
    elif data.ignore_classes is not None and (both := sorted(set(data.ignore_classes) & set(cfg.class_names))):
        problems.append(f"data.ignore_classes: {both} are also in data.classes")
    problems += [f"data.augment.{problem}" for problem in data.augment.problems()]
    if len(data.synthetic_objects) != 2 or data.synthetic_objects[0] > data.synthetic_objects[1]:
        problems.append(f"data.synthetic_objects must be [min, max] with min <= max, got {data.synthetic_objects}")
    if data.classes == "dataset" and data.format != "coco":
        problems.append("data.classes 'dataset' reads the categories of a COCO file: set data.format coco")
    if cfg.eval.metric == "coco" and data.format != "coco":
        problems.append("eval.metric coco scores against a COCO annotation file: set data.format coco")
    problems += _range_problems(cfg)
    if sorted(cfg.optim.milestones) != cfg.optim.milestones:
        problems.append(f"optim.milestones must increase, got {cfg.optim.milestones}")
    if cfg.distill is not None and (
        not cfg.distill.methods or len(set(cfg.distill.methods)) != len(cfg.distill.methods)
    ):
        problems.append(f"distill.methods: name one or more distinct methods, got {cfg.distill.methods}")
    if cfg.model.dfl_bins < 0 or cfg.model.dfl_bins == 1:
        problems.append(f"model.dfl_bins: 0 (plain box head) or >= 2, got {cfg.model.dfl_bins}")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def evaluation_config(
    path: str | os.PathLike | None = None,
    *,
    voc_root: str | os.PathLike | None = None,
    year: str | None = None,
    image_set: str | None = None,
    coco_json: str | os.PathLike | None = None,
    coco_images: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    ignore_classes: Sequence[str] | None = None,
    metric: str | None = None,
    reads_images: bool = False,
) -> Config:
    """The config of an evaluation (``scripts/evaluate.py``): the file at ``path`` with the test set, the
    classes and the metric given here on top (None keeps the file's), validated as :func:`load_config`
    validates.

    Without a file nothing is assumed about the data: VOC data needs ``voc_root``, ``year`` and
    ``image_set`` and is scored on the 20 VOC classes; COCO data (``coco_json``, or a file's
    ``data.format: coco``) on the annotation file's categories with the coco metric. ``reads_images``: a
    model will run on the images, so COCO data needs their folder (``coco_images`` or
    ``data.coco.test_images``); scoring result files reads the annotations alone.
    """
    cfg = load_config(path) if path is not None else Config()
    data = cfg.data
    is_coco = coco_json is not None or data.format == "coco"
    if classes is not None:
        _set(data, "classes", list(classes), "data.classes")
    elif path is None:
        data.classes = "dataset" if is_coco else "voc"
    if ignore_classes is not None:
        _set(data, "ignore_classes", list(ignore_classes), "data.ignore_classes")
    if metric is not None:
        _set(cfg.eval, "metric", metric, "eval.metric")
    elif path is None and is_coco:
        cfg.eval.metric = "coco"
    if is_coco:
        _coco_test_set(data, coco_json, coco_images, reads_images)
    else:
        _voc_test_set(data, path is not None, voc_root, year, image_set)
    _validate(cfg, str(path) if path is not None else "evaluation")
    return cfg


def _set(section: Any, name: str, value: Any, key: str) -> None:
    """``section.name = value``, checked against the field's type as a config file's value is."""
    setattr(section, name, check_value(value, typing.get_type_hints(type(section))[name], key))


def _voc_test_set(
    data: DataConfig, from_file: bool, voc_root: str | os.PathLike | None, year: str | None, image_set: str | None
) -> None:
    """``data``'s VOC test set: ``voc_root`` and ``year``_``image_set`` over a file's (:func:`evaluation_config`)."""
    if voc_root is not None:
        data.voc_root = str(voc_root)
    elif not from_file:
        raise ConfigError("VOC data needs voc_root (or a config with data.voc_root)")
    if year and image_set:
        data.test_sets = f"{year}_{image_set}"
    elif year or image_set or not from_file:
        raise ConfigError("give year and image_set (or a config whose data.test_sets names the set)")


def _coco_test_set(
    data: DataConfig, coco_json: str | os.PathLike | None, coco_images: str | os.PathLike | None, reads_images: bool
) -> None:
    """``data``'s COCO test set: ``coco_json`` and ``coco_images`` over a file's (:func:`evaluation_config`)."""
    coco = data.coco
    data.format = "coco"
    if coco_json is not None:
        coco.test_json = str(coco_json)
    if coco_images is not None:
        coco.test_images = str(coco_images)
    if coco.test_json is None:
        raise ConfigError("COCO data needs coco_json (or a config with data.coco.test_json)")
    if coco.test_images is None:
        if reads_images:
            raise ConfigError("running a model on COCO data needs coco_images (or a config with data.coco.test_images)")
        coco.test_images = str(Path(coco.test_json).parent)  # not read: the annotations are scored alone
    if coco.train_json is None:  # an evaluation reads no training set; the test file stands in, categories and all
        coco.train_json, coco.train_images = coco.test_json, coco.test_images


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def scaled_lr(cfg: Config, world_size: int = 1) -> float:
    """The linear scaling rule: ``lr * (batch_size * world_size) / reference_batch_size``."""
    return cfg.optim.lr * cfg.data.batch_size * world_size / cfg.optim.reference_batch_size
