"""demo.py on images, a folder, a video and corrupt or truncated files; Predictor agrees with the evaluation path."""

import re

import cv2
import numpy as np
import torch
from _bad_images import noisy_jpeg

from odkd.checkpoint import save_model
from odkd.class_names import SYNTHETIC_CLASSES
from odkd.data import VOCDataset
from odkd.data.synthetic import make_synthetic_voc
from odkd.data.voc import read_image
from odkd.inference import Predictor, detect_dataset
from odkd.models import build_model
from odkd.postprocess_settings import PostprocessSettings


def test_predictor_matches_dataset_detection(tmp_path):
    make_synthetic_voc(tmp_path / "voc", {"test": 2}, seed=3, min_size=120, max_size=200)
    dataset = VOCDataset(tmp_path / "voc", "SYN_test", SYNTHETIC_CLASSES)
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5)
    # Away from the per-image cap, where near-equal scores of a random model could be cut differently.
    settings = PostprocessSettings(score_threshold=0.2, max_detections=10_000)
    cpu = torch.device("cpu")
    detections = detect_dataset(model, dataset, cpu, batch_size=2, num_workers=0, progress=False, settings=settings)
    predictor = Predictor(model, cpu, settings)
    for index in range(len(dataset)):
        det = predictor(read_image(dataset.image_path(index)))
        found = detections[index]
        for label in range(1, len(SYNTHETIC_CLASSES) + 1):
            ours = det.boxes[det.labels == label].numpy() + np.array([1, 1, 0, 0])  # devkit pixels are 1-based
            theirs = found.boxes[found.labels == label]
            np.testing.assert_allclose(np.sort(ours, axis=0), np.sort(theirs, axis=0), atol=1e-3)


def test_demo_draws_images_folders_and_videos(tmp_path, run_script):
    make_synthetic_voc(tmp_path / "voc", {"test": 3}, seed=4, min_size=120, max_size=200)
    images = sorted((tmp_path / "voc" / "VOCSYN" / "JPEGImages").glob("*.jpg"))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "cut.jpg").write_bytes(noisy_jpeg()[:3000])  # OpenCV draws it, grey below the cut
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (200, 150))
    for i in range(4):
        writer.write(np.full((150, 200, 3), 40 * i, dtype=np.uint8))
    writer.release()
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5)
    model.class_names = SYNTHETIC_CLASSES
    save_model(model, tmp_path / "model.pt")
    done = run_script(
        "demo.py", "--checkpoint", tmp_path / "model.pt", "--input", images[0], images[0].parent,
        tmp_path / "broken.jpg", tmp_path / "cut.jpg", video, "--output", tmp_path / "out", "--min-score", "0.2",
        "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(re.findall(r"\.jpg \d+x\d+: [\d.]+ ms, \d+ detections", done.stdout)) == 4  # one file + a folder of 3
    assert "clip.avi: 4 frames" in done.stdout and re.search(r"8 images on cpu .* [\d.]+ ms per image", done.stdout)
    assert "broken.jpg: not a readable image" in done.stderr
    cut = f"skipped: {tmp_path / 'cut.jpg'}: truncated JPEG (the file ends before its end-of-image marker)"
    assert f"{cut}: copy it again" in done.stderr.splitlines()
    assert "Traceback" not in done.stderr
    expected = {p.stem + ".jpg" for p in images} | {"clip.mp4"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(expected)
    written = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    assert int(written.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    drawn = cv2.imread(str(tmp_path / "out" / images[0].name))
    assert drawn.shape == cv2.imread(str(images[0])).shape
    missing = run_script("demo.py", "--checkpoint", tmp_path / "model.pt", "--input", tmp_path / "nowhere",
                         "--output", tmp_path / "out")  # fmt: skip
    assert missing.returncode == 1 and "input" in missing.stderr and "does not exist" in missing.stderr
