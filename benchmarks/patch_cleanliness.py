"""How clean are a ViT's patch features, before and after post-hoc registers (PH-Reg)?

    python benchmarks/patch_cleanliness.py checkpoints/salt-stage1-digits checkpoints/posthoc-registers-digits \
        --output visuals/phreg

For each network (any run folder, checkpoint or export; the trained network of a run), on the held-out images:

- artifact share: patch tokens whose norm lies beyond Tukey's far-out fence Q3 + 3 IQR of all tokens' norms (the
  high-norm tokens of Darcet et al. 2024, "Vision Transformers Need Registers", without a model-specific
  threshold), measured on the last block's output before the final LayerNorm: after it, every token has about
  the same norm
- max / median token norm, there too
- neighbour cosine: mean cosine similarity of each patch token with its right and lower neighbours (smooth,
  local features are high; isolated artifact tokens pull it down)
- k-NN (k=20) of the average of the final patch tokens, the train split as the bank: the same pooling for every
  network, whatever its own head uses (PH-Reg trains the patch tokens, not the class token)

and draws, for the first --images images, the patch-feature PCA (ssd/visualize.py) and the token-norm map of both
networks into --output as PNG files. Prints its machine, settings and results (a Markdown table and JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eval_protocols.knn import knn_classify
from ssd.checkpoint_import import load_backbone_for_eval
from ssd.config import DataConfig
from ssd.data import build_dataset, eval_transform
from ssd.visualize import _nearest, displayable, labelled_picture, patch_features, pca_picture, weights_title


def norm_outlier_share(norms: torch.Tensor) -> torch.Tensor:
    """Share of the token norms (any shape) beyond Tukey's far-out fence Q3 + 3 (Q3 - Q1)."""
    low, high = torch.quantile(norms.flatten(), torch.tensor([0.25, 0.75]))
    return (norms > high + 3 * (high - low)).float().mean()


@torch.no_grad()
def residual_stream(backbone, images: torch.Tensor) -> torch.Tensor:
    """The last block's patch tokens before the final norm, (B, D, h, w)."""
    return backbone.eval().forward_intermediates(images, indices=1, norm=False, intermediates_only=True)[-1]


def neighbour_cosine(grid: torch.Tensor) -> torch.Tensor:
    """grid (B, D, h, w) -> mean cosine of every token with its right and lower neighbour."""
    right = F.cosine_similarity(grid[..., :, 1:], grid[..., :, :-1], dim=1)
    down = F.cosine_similarity(grid[..., 1:, :], grid[..., :-1, :], dim=1)
    return torch.cat([right.flatten(), down.flatten()]).mean()


def cleanliness(features: torch.Tensor, stream: torch.Tensor) -> dict:
    """features: final patch features, stream: the same tokens before the final norm, both (B, D, h, w)."""
    norms = stream.norm(dim=1)  # (B, h, w)
    return {"artifact_share": float(norm_outlier_share(norms)),
            "max_over_median_norm": float(norms.max() / norms.median()),
            "neighbour_cosine": float(neighbour_cosine(features))}


def features_of(backbone, dataset, transform, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, final patch features (B, D, h, w), labels) of the first `count` images of `dataset`."""
    loaded = [dataset.load(index) for index in range(count)]
    images = torch.stack([transform(image) for image, _ in loaded])
    grid = torch.cat([patch_features(backbone, chunk) for chunk in images.split(256)]).float()
    return images, grid, torch.tensor([label for _, label in loaded])


def norm_picture(stream: torch.Tensor, images: torch.Tensor, names: list[str], title: str, mean, std):
    norms = stream.norm(dim=1, keepdim=True)  # (B, 1, h, w), one scale for all images: outliers stand out
    norms = (norms - norms.min()) / (norms.max() - norms.min()).clamp_min(1e-8)
    maps = _nearest(norms, images.shape[-2:]).expand(-1, 3, -1, -1)
    tiles = torch.stack([displayable(images, mean, std), maps], dim=1)
    return labelled_picture(tiles, [[name, "token norm"] for name in names], f"patch token norms | {title}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("networks", nargs="+", help="run folders, checkpoints or exports (e.g. before and after)")
    parser.add_argument("--output", default="visuals/patch_cleanliness", help="folder for the PNG pictures")
    parser.add_argument("--dataset", default="digits", help="digits | cifar10 | imagefolder | folder")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images for the numbers (0: all)")
    parser.add_argument("--images", type=int, default=8, help="images drawn in the pictures")
    args = parser.parse_args()
    data = DataConfig(dataset=args.dataset, root=args.data_root)
    dataset, bank = build_dataset(data, args.split), build_dataset(data, "train")
    count = min(args.limit or len(dataset), len(dataset))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"# {args.dataset} split {args.split}: {count} images; pictures of the first {args.images} in {output}")
    rows = []
    for network in args.networks:
        backbone, info = load_backbone_for_eval(network)
        transform = eval_transform(info.get("resize") or 256, info.get("crop") or 224, info["mean"], info["std"])
        images, grid, labels = features_of(backbone, dataset, transform, count)
        _, bank_grid, bank_labels = features_of(backbone, bank, transform, len(bank))
        knn = knn_classify(bank_grid.mean(dim=(2, 3)), bank_labels, grid.mean(dim=(2, 3)), labels, ks=(20,))
        stream = torch.cat([residual_stream(backbone, chunk) for chunk in images.split(256)]).float()
        title, stem = weights_title(info, info["which"])
        shown, names = images[:args.images], [dataset.describe(index) for index in range(min(args.images, count))]
        pca_picture(backbone, shown, names, title, info["mean"], info["std"]).save(output / f"pca_{stem}.png")
        norm_picture(stream[:args.images], shown, names, title, info["mean"], info["std"]).save(
            output / f"norms_{stem}.png")
        rows.append({"network": str(network), "registers": backbone.num_prefix_tokens - int(
            getattr(backbone, "cls_token", None) is not None), **cleanliness(grid, stream),
                     "knn_avg_patches": knn["k=20"]["top1"]})
    print("\n| network | registers | artifact share | max / median norm | neighbour cosine | k-NN, averaged patches |"
          "\n|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['network']} | {row['registers']} | {row['artifact_share']:.2%} | "
              f"{row['max_over_median_norm']:.2f} | {row['neighbour_cosine']:.3f} | {row['knn_avg_patches']:.2f}% |")
    print("\n" + "\n".join(json.dumps(row) for row in rows))
    print(f"pictures: {', '.join(sorted(path.name for path in output.glob('*.png')))}")


if __name__ == "__main__":
    main()
