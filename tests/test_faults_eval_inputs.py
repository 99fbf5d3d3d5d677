"""Bad input to the evaluation side, on real files: unreadable images in the k-NN / linear protocols and the
end-of-run k-NN, files given as weights that are not weights, and the permissions of an export."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from eval_protocols import knn, linear
from ssd.checkpoint_import import WeightsError, load_backbone_for_eval
from ssd.config import Config, ModelConfig
from ssd.data import BadImageWarning, UnreadableImageError
from ssd.engine.checkpoint import save_checkpoint
from ssd.export import export_backbone
from ssd.export import main as export_main
from ssd.models.backbone import build_backbone
from tests.test_export import _Payload

TINY = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, drop_path_rate=0.0,
                   timm_kwargs={"depth": 4})  # 4: the feature cache keeps the last 4 blocks
EXPECTED = "expected an ssd run folder or checkpoint, an ssd export, or an official DINO/DINOv2 .pth"

# ----------------------------------------------------------------------------------------------------------
# Fixtures: a tiny ImageFolder with one broken file per split, a tiny run


@pytest.fixture(scope="module")
def folder_with_broken_images(tmp_path_factory) -> Path:
    """train/ (6 images per class) and test/ (3 per class) of real JPEG and PNG files, plus one file per split
    that is not an image: train/class_0/broken_train.jpg and test/class_1/broken_test.png."""
    root = tmp_path_factory.mktemp("broken_data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 3)):
        for label in range(2):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for number in range(count):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                pixels[..., label] = 255  # the class shows: red or green
                Image.fromarray(pixels).save(folder / f"{number}.{'jpg' if number % 2 else 'png'}")
    (root / "train" / "class_0" / "broken_train.jpg").write_bytes(b"not an image")
    (root / "test" / "class_1" / "broken_test.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    state = build_backbone(TINY).state_dict()
    run_dir = tmp_path_factory.mktemp("run")
    save_checkpoint(run_dir / "checkpoint_00000003.pt", {
        "config": {"model": dataclasses.asdict(TINY), "data": {"mean": [0.5] * 3, "std": [0.25] * 3}},
        "step": 3, "epoch": 0,
        "method": {f"{role}.backbone.{k}": v for role in ("teacher", "student") for k, v in state.items()},
    })
    return run_dir


def protocol_args(run: Path, data: Path, *extra: str) -> list[str]:
    return [str(run), "--dataset", "imagefolder", "--data-root", str(data), "--resize", "32", "--crop", "32",
            "--num-workers", "0", "--batch-size", "64", *extra]


def warned_files(caught) -> str:
    return " ".join(str(w.message) for w in caught if issubclass(w.category, BadImageWarning))


# ----------------------------------------------------------------------------------------------------------
# Unreadable images in the evaluation protocols


def test_knn_leaves_unreadable_images_out_and_reports_them(folder_with_broken_images, tiny_run, tmp_path):
    args = protocol_args(tiny_run, folder_with_broken_images, "--ks", "3", "--cache-dir", str(tmp_path / "cache"))
    with pytest.warns(BadImageWarning) as caught:
        extracted = knn.main(args)
    warned = warned_files(caught)
    assert "skipping unreadable image" in warned
    assert str(folder_with_broken_images / "train" / "class_0" / "broken_train.jpg") in warned
    assert str(folder_with_broken_images / "test" / "class_1" / "broken_test.png") in warned
    cached = knn.main(args)  # the cache keeps which rows were unreadable
    for report in (extracted, cached):
        assert report["skipped_images"] == {"train": 1, "test": 1}
        assert report["train_size"] == 12 and report["test_size"] == 6 and report["on_bad_image"] == "skip"
    assert cached["results"] == extracted["results"]


@pytest.mark.parametrize("protocol", [knn, linear])
def test_fail_mode_stops_naming_the_file_and_the_option(folder_with_broken_images, tiny_run, protocol):
    # Which broken file comes first depends on the protocol (linear reads its validation part and test first).
    with pytest.raises(UnreadableImageError, match=r"broken_(train\.jpg|test\.png).*--on-bad-image skip"):
        protocol.main(protocol_args(tiny_run, folder_with_broken_images, "--on-bad-image", "fail"))


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_linear_probe_leaves_unreadable_images_out(folder_with_broken_images, tiny_run, mode):
    with pytest.warns(BadImageWarning) as caught:
        report = linear.main(protocol_args(tiny_run, folder_with_broken_images, "--mode", mode, "--epochs", "2",
                                           "--lrs", "0.1", "--n-last-blocks", "1", "--avgpool", "off",
                                           "--val-fraction", "0.25"))
    assert "broken_train.jpg" in warned_files(caught) and "broken_test.png" in warned_files(caught)
    assert report["skipped_images"] == {"train": 1, "test": 1}
    assert report["train_size"] + report["val_size"] == 12 and report["test_size"] == 6
    assert 0 <= report["results"]["trained teacher"]["best"]["test_top1"] <= 100


def test_max_image_pixels_reaches_the_protocols(folder_with_broken_images, tiny_run):
    with pytest.warns(BadImageWarning, match=r"40 x 40 = 1600 pixels, above the limit of 1000"):
        with pytest.raises(RuntimeError, match="all 13 images of the train split are unreadable"):
            knn.main(protocol_args(tiny_run, folder_with_broken_images, "--max-image-pixels", "1000"))


def test_end_of_run_knn_report_skips_a_broken_test_image(folder_with_broken_images, tmp_path):
    cfg = Config()
    cfg.model = TINY
    cfg.data.dataset, cfg.data.root = "imagefolder", str(folder_with_broken_images)
    cfg.eval.resize_size, cfg.eval.crop_size, cfg.eval.batch_size, cfg.eval.knn_k = 32, 32, 16, [3]
    from ssd.knn_report import knn_report

    with pytest.warns(BadImageWarning, match="broken_test.png"):
        report = knn_report(cfg, {"teacher": (build_backbone(TINY), dataclasses.asdict(TINY))}, tmp_path, torch.device("cpu"))
    assert report["skipped_images"] == {"train": 1, "test": 1}
    assert json.loads((tmp_path / "knn.json").read_text())["skipped_images"] == {"train": 1, "test": 1}
    assert 0 <= report["results"]["raw pixels"]["k=3"]["top1"] <= 100
    cfg.data.on_bad_image = "fail"
    with pytest.raises(UnreadableImageError, match=r"broken_train\.jpg.*data\.on_bad_image=skip"):
        knn_report(cfg, {"teacher": (build_backbone(TINY), dataclasses.asdict(TINY))}, tmp_path, torch.device("cpu"))


def test_distributed_extraction_marks_unreadable_rows_on_every_process(folder_with_broken_images, tmp_path):
    from eval_protocols.features import extract
    from ssd.data import ImageFolderDataset
    from tests.test_eval_features import _extract_worker, _free_port, tiny_vit, transform

    root = folder_with_broken_images / "train"  # 13 files on 2 processes: padded shards, one unreadable
    mp.spawn(_extract_worker, args=(2, _free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    with pytest.warns(BadImageWarning):
        expected, labels, readable = extract(tiny_vit(), ImageFolderDataset(root), transform(), kind="tokens",
                                             batch_size=13, num_workers=0, device="cpu", progress=False)
    unreadable = [ImageFolderDataset(root).paths[i] for i in torch.nonzero(~readable).flatten()]
    assert unreadable == [str(root / "class_0" / "broken_train.jpg")]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(result["readable"], readable) and torch.equal(result["labels"], labels)
        for name, value in expected.items():
            torch.testing.assert_close(result["outputs"][name], value, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Files given as weights that are not weights


@pytest.fixture(scope="module")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    return export_backbone(tiny_run, tmp_path_factory.mktemp("export") / "tiny")


def test_a_config_yaml_given_to_knn_is_named_as_such(folder_with_broken_images, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  arch: vit_small_patch16_224\ndata:\n  root: /data\n")
    with pytest.raises(WeightsError) as caught:
        knn.main(protocol_args(config, folder_with_broken_images))
    assert str(caught.value) == f"{config} is a YAML text file (a config?), not weights; {EXPECTED}"


@pytest.mark.parametrize("name, write, kind", [
    ("photo.jpg", lambda p: Image.new("RGB", (8, 8)).save(p), "a JPEG image"),
    ("weights.pth", lambda p: Image.new("RGB", (8, 8)).save(p, format="PNG"), "a PNG image"),
    ("empty.pth", lambda p: p.write_bytes(b""), "an empty file"),
    ("config.json", lambda p: p.write_text('{"arch": "vit"}'), "a JSON text file"),
    ("notes.pth", lambda p: p.write_text("trained on 8 GPUs\n"), "a text file"),
])
def test_files_that_are_not_weights_say_what_they_are(tmp_path, name, write, kind):
    write(tmp_path / name)
    with pytest.raises(WeightsError) as caught:
        load_backbone_for_eval(tmp_path / name)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / name} is {kind}") and EXPECTED in message
    assert "pickle" not in message and "arbitrary code" not in message


def test_zips_that_are_not_checkpoints(tmp_path, tiny_run):
    import zipfile

    with zipfile.ZipFile(tmp_path / "images.pth", "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(WeightsError, match=r"images\.pth is a zip archive that is not a torch checkpoint"):
        load_backbone_for_eval(tmp_path / "images.pth")
    checkpoint = next(tiny_run.glob("checkpoint_*.pt")).read_bytes()
    (tmp_path / "cut.pt").write_bytes(checkpoint[: len(checkpoint) // 2])  # a copy interrupted half-way
    with pytest.raises(WeightsError, match=r"cut\.pt is a truncated or corrupt zip archive"):
        load_backbone_for_eval(tmp_path / "cut.pt")


def test_corrupt_safetensors_are_named_corrupt(tmp_path, tiny_export):
    (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(WeightsError, match=r"random\.safetensors is not a valid safetensors file \(.*\): "
                                           r"corrupt or truncated, re-export it"):
        load_backbone_for_eval(tmp_path / "random.safetensors")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((tiny_export / "config.json").read_bytes())
    weights = (tiny_export / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) * 2 // 3])
    with pytest.raises(WeightsError, match=r"truncated/model\.safetensors is not a valid safetensors file"):
        load_backbone_for_eval(truncated)


def test_broken_export_config_names_the_file_and_the_json_error(tmp_path, tiny_export):
    broken = tmp_path / "export"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((tiny_export / "model.safetensors").read_bytes())
    (broken / "config.json").write_text('{\n  "architecture": "vit_tiny_patch16_224",\n  "ssd": {,}\n}\n')
    with pytest.raises(WeightsError, match=r"export/config\.json is not valid JSON \(Expecting property name "
                                           r"enclosed in double quotes at line 3, column 11\)"):
        load_backbone_for_eval(broken)
    (broken / "config.json").write_text('{"architecture": "vit_tiny_patch16_224"}')  # timm's, not ssd's
    with pytest.raises(WeightsError, match=r"config\.json lacks the ssd\.model"):
        load_backbone_for_eval(broken)


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_still_refused_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "pwned"
    content = {"evil": _Payload(str(marker)), "teacher": {"backbone.cls_token": torch.zeros(1)}}
    if legacy:  # a bare pickle stream, as torch's legacy format and plain pickle.dump write
        (tmp_path / "evil.pth").write_bytes(pickle.dumps(content, protocol=2))
    else:
        torch.save(content, tmp_path / "evil.pth")
    refused = r"refusing to load .*evil\.pth: it holds pickled objects .*(?i:unsupported global).*mkdir.*arbitrary code"
    with pytest.raises(WeightsError, match=refused):
        load_backbone_for_eval(tmp_path / "evil.pth")
    assert not marker.exists()


def test_export_refuses_an_image_given_as_checkpoint(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "checkpoint_00000001.jpg", format="JPEG")
    with pytest.raises(WeightsError, match=r"checkpoint_00000001\.jpg is a JPEG image, not weights"):
        export_main([str(tmp_path / "checkpoint_00000001.jpg"), "--out", str(tmp_path / "out")])


# ----------------------------------------------------------------------------------------------------------
# Permissions of an export


def test_export_files_are_readable_like_the_rest_of_the_run_folder(tiny_run, tmp_path):
    previous = os.umask(0o022)
    try:
        out = export_backbone(tiny_run, tmp_path / "export")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json"):
        assert oct((out / name).stat().st_mode & 0o777) == oct(0o644), name
