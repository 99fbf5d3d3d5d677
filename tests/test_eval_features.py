"""Feature extraction: token outputs, dataset order across real gloo processes, and the on-disk cache."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from eval_protocols.cache import cached_extract
from eval_protocols.features import backbone_outputs, extract, extract_features


def tiny_vit(registers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             dynamic_img_size=True, reg_tokens=registers).eval()


def image_folder(root: Path, count: int) -> Path:
    """An ImageFolder of ``count`` real PNG files in 2 classes, every image different."""
    for number in range(count):
        folder = root / f"class_{number % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(number))
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{number:03d}.png")
    return root


def transform():
    from ssd.data import eval_transform

    return eval_transform(36, 32)


def test_token_outputs_match_the_backbone():
    backbone = tiny_vit(registers=2)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outputs = backbone_outputs(backbone, images, "tokens", n_last_blocks=4)
        tokens = backbone.forward_features(images)  # (B, 1 + 2 registers + 16 patches, D), final norm applied
    assert outputs["cls"].shape == (3, 4, 192)
    torch.testing.assert_close(outputs["pooled"], backbone(images))
    torch.testing.assert_close(outputs["cls"][:, -1], tokens[:, 0])
    torch.testing.assert_close(outputs["patch_mean"], tokens[:, 3:].mean(dim=1))  # registers excluded


def test_non_vit_gives_pooled_features_only():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    outputs = backbone_outputs(backbone, torch.randn(2, 3, 32, 32), "tokens")
    assert set(outputs) == {"pooled"} and outputs["pooled"].shape == (2, 512)


def test_extract_features_in_dataset_order(tmp_path):
    from ssd.data import ImageFolderDataset

    dataset = ImageFolderDataset(image_folder(tmp_path / "images", 7))
    backbone = tiny_vit()
    features, labels = extract_features(backbone, dataset, transform(), batch_size=3, num_workers=0, device="cpu")
    assert labels.tolist() == list(dataset.targets)
    one_by_one = torch.stack([backbone(transform()(dataset.load(i)[0])[None])[0] for i in range(len(dataset))])
    torch.testing.assert_close(features, one_by_one.detach(), rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _extract_worker(rank: int, world_size: int, port: int, root: str, out_dir: str) -> None:
    from ssd.data import ImageFolderDataset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        outputs, labels, readable = extract(tiny_vit(), ImageFolderDataset(root), transform(), kind="tokens",
                                            batch_size=2, num_workers=0, device="cpu", progress=False)
        torch.save({"outputs": outputs, "labels": labels, "readable": readable}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_extraction_gathers_in_dataset_order(tmp_path):
    from ssd.data import ImageFolderDataset

    root = image_folder(tmp_path / "images", 7)  # 7 images on 2 processes: one shard is padded
    mp.spawn(_extract_worker, args=(2, _free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    expected, expected_labels, readable = extract(tiny_vit(), ImageFolderDataset(root), transform(), kind="tokens",
                                                  batch_size=7, num_workers=0, device="cpu", progress=False)
    assert readable.all()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(result["labels"], expected_labels) and torch.equal(result["readable"], readable)
        for name, value in expected.items():
            torch.testing.assert_close(result["outputs"][name], value, rtol=1e-4, atol=1e-5)


class CountingBackbone(torch.nn.Module):
    """A frozen linear map that counts how many images it has seen (to tell extraction from cache reads)."""

    def __init__(self, seed: int):
        super().__init__()
        self.projection = torch.nn.Linear(3 * 32 * 32, 8)
        torch.nn.init.normal_(self.projection.weight, generator=torch.Generator().manual_seed(seed))
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += len(images)
        return self.projection(images.flatten(1))


def test_cache_is_reused_only_for_the_same_weights_and_transform(tmp_path):
    from ssd.data import ImageFolderDataset, eval_transform

    dataset = ImageFolderDataset(image_folder(tmp_path / "images", 5))
    cache_dir = tmp_path / "cache"

    def run(backbone, weights_id, resize=36):
        view = eval_transform(resize, 32)
        description = {"weights": weights_id, "transform": repr(view), "data": {"split": "train", "images": 5}}
        return cached_extract(cache_dir, description, backbone, dataset, view, batch_size=4, num_workers=0,
                              device="cpu", progress=False)

    first = CountingBackbone(seed=0)
    features, labels, _ = run(first, {"file": "a.pt"})
    assert first.images_seen == 5 and len(list(cache_dir.glob("*.safetensors"))) == 1
    again = CountingBackbone(seed=0)
    cached_features, cached_labels, _ = run(again, {"file": "a.pt"})
    assert again.images_seen == 0  # read from disk
    torch.testing.assert_close(cached_features["pooled"], features["pooled"])
    assert torch.equal(cached_labels, labels)

    other = CountingBackbone(seed=1)
    other_features, _, _ = run(other, {"file": "b.pt"})  # another checkpoint: extracted afresh
    assert other.images_seen == 5
    assert not torch.allclose(other_features["pooled"], features["pooled"])
    other_view = CountingBackbone(seed=0)
    run(other_view, {"file": "a.pt"}, resize=48)  # same checkpoint, another transform
    assert other_view.images_seen == 5
    assert len(list(cache_dir.glob("*.safetensors"))) == 3


def test_cache_file_with_another_record_is_not_reused(tmp_path):
    from eval_protocols.cache import cache_path, read_cache, write_cache

    description = {"weights": {"file": "a.pt"}, "transform": "T", "data": {"split": "train"}}
    path = cache_path(tmp_path, description)
    write_cache(path, description, {"pooled": torch.ones(2, 3)}, torch.tensor([0, 1]), torch.tensor([True, True]))
    assert read_cache(path, description) is not None
    assert read_cache(path, {**description, "weights": {"file": "b.pt"}}) is None


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown feature kind"):
        backbone_outputs(tiny_vit(), torch.randn(1, 3, 32, 32), "bogus")


def test_rope_vit_gives_block_tokens_like_a_vit():
    """DINOv3's RoPE models (timm Eva) feed the linear protocol the same way: CLS of the last blocks, patch mean."""
    import timm

    from eval_protocols.features import backbone_outputs

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              depth=3, embed_dim=64, num_heads=2, global_pool="token").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = backbone_outputs(model, images, "tokens", n_last_blocks=2)
        sequence = model.forward_features(images)
    assert outputs["cls"].shape == (2, 2, 64) and outputs["patch_mean"].shape == (2, 64)
    torch.testing.assert_close(outputs["cls"][:, -1], sequence[:, 0])
    torch.testing.assert_close(outputs["patch_mean"], sequence[:, model.num_prefix_tokens:].mean(dim=1))
