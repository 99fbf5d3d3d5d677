"""The linear probe's two protocols: DINO's single setting (its schedule against torch's CosineAnnealingLR, the
command end to end) and the grid's report (winner marked, edge-of-grid warning, lr per 256 images and as used)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from eval_protocols import linear
from eval_protocols.linear_heads import LinearGrid, Setting
from eval_protocols.linear_report import edge_warning, format_result
from eval_protocols.linear_training import cached_batches, select_and_test, train_grid
from tests.test_eval_baselines import COMMON, tiny_checkpoint


def features(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, (count,), generator=generator)
    cls = torch.randn(count, 1, 8, generator=generator)
    cls[torch.arange(count), 0, labels] += 2.0
    return {"cls": cls, "patch_mean": torch.randn(count, 8, generator=generator)}, labels


def test_per_epoch_schedule_is_dinos_cosine_annealing(torch_single_thread):
    """DINO: SGD(lr x batch / 256, momentum 0.9, weight decay 0) and CosineAnnealingLR(epochs, eta_min=0) stepped
    after each epoch. The same loop written with torch's scheduler gives the same head."""
    outputs, labels = features(48, 0)
    epochs, batch_size, lr_scale = 4, 16, 16 / 256
    torch.manual_seed(0)
    grid = LinearGrid([Setting(0.5, 1, False)], outputs, 3)
    reference = copy.deepcopy(grid.heads[0])
    train_grid(grid, cached_batches(outputs, labels, batch_size, seed=0), epochs, 3, lr_scale, torch.device("cpu"),
               schedule="epoch")

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5 * lr_scale, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    batches = cached_batches(outputs, labels, batch_size, seed=0)
    for epoch in range(epochs):
        for batch, batch_labels in batches(epoch):
            loss = F.cross_entropy(reference(batch["cls"][:, -1]), batch_labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    torch.testing.assert_close(grid.heads[0].weight, reference.weight)
    torch.testing.assert_close(grid.heads[0].bias, reference.bias)


def test_dino_protocol_command_trains_one_head_on_augmented_images(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "run", seed=0)
    report = linear.main([str(tmp_path / "run"), *COMMON, "--protocol", "dino", "--epochs", "1"])
    result = report["results"]["trained teacher"]
    # DINO's defaults: lr 0.001 per 256 images, the last 4 blocks' class tokens (this model has 2), no avgpool.
    assert [row["name"] for row in result["grid"]] == ["lr=0.001 blocks=2 avgpool=0"]
    assert result["best"]["actual_lr"] == pytest.approx(0.001 * 100 / 256)
    assert report["linear_protocol"] == "dino" and report["mode"] == "full" and report["val_fraction"] is None
    assert report["train_size"] == 100 and report["val_size"] == 0 and report["test_size"] == 100
    assert 0 <= result["best"]["test_top1"] <= 100 and "warning" not in result
    assert "DINO protocol" in capsys.readouterr().out


def test_dino_protocol_refuses_a_grid(capsys):
    with pytest.raises(SystemExit) as exited:
        linear.parse_args(["run", "--protocol", "dino", "--lrs", "0.001", "0.01"])
    assert exited.value.code == 2 and "give one --lrs value" in capsys.readouterr().err
    args = linear.parse_args(["run", "--protocol", "dino", "--lrs", "0.01", "--n-last-blocks", "1", "--avgpool", "on"])
    assert (args.lrs, args.n_last_blocks, args.avgpool) == ([0.01], [1], "on")  # DINO's ViT-B setting
    grid = linear.parse_args(["run"])
    assert len(grid.lrs) == 13 and grid.n_last_blocks == [1, 4] and grid.avgpool == "both"


def test_grid_report_marks_the_winner_and_warns_when_it_is_on_the_edge(torch_single_thread):
    outputs, labels = features(90, 1)
    torch.manual_seed(0)
    grid = LinearGrid([Setting(lr, 1, False) for lr in (1e-5, 1e-4, 1.0)], outputs, 3)
    train_grid(grid, cached_batches(outputs, labels, 30, 0), 5, 3, 0.5, torch.device("cpu"))
    val, test = features(30, 2), features(30, 3)
    result = select_and_test(grid, val, test, torch.device("cpu"), lr_scale=0.5)
    assert [row["lr_per_256"] for row in result["grid"]] == [1e-5, 1e-4, 1.0]
    assert [row["actual_lr"] for row in result["grid"]] == [0.5e-5, 0.5e-4, 0.5]  # x global batch / 256
    assert result["best"]["lr_per_256"] == 1.0  # 5 epochs: only the largest lr gets anywhere
    warning = edge_warning(result, [1e-5, 1e-4, 1.0])
    assert "is the largest of the grid" in warning and "--lrs 1e-05 0.0001 1 2 5 10" in warning
    printed = format_result("trained teacher", {**result, "warning": warning}, "grid", 0.5)
    marked = [line for line in printed.splitlines() if line.endswith("<- best")]
    assert len(marked) == 1 and "lr=1 " in marked[0]
    assert "warning: the best learning rate" in printed and "lr per 256 images" in printed

    low = {"best": {**result["best"], "lr_per_256": 1e-4}}
    assert "smallest of the grid" in edge_warning(low, [1e-4, 1e-2, 10.0])
    assert edge_warning({"best": {"lr_per_256": 1e-2}}, [1e-4, 1e-2, 10.0]) is None  # inside the grid
    assert edge_warning({"best": {"lr_per_256": 1e-2}}, [1e-2]) is None  # a single lr has no edge to speak of
