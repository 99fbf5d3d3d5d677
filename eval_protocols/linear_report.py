"""What the linear probe prints and warns about: the table of settings with the winner marked, a winner on the
edge of the learning-rate grid, and the candidates' test accuracies side by side."""

from __future__ import annotations


def edge_warning(result: dict, lrs) -> str | None:
    """A warning when the best learning rate is the smallest or largest of a grid of several: the optimum may
    lie beyond it, and the figure is then an underestimate of what the features allow."""
    lrs = sorted(set(float(lr) for lr in lrs))
    best = result["best"]["lr_per_256"]
    if len(lrs) < 2 or best not in (lrs[0], lrs[-1]):
        return None
    side, extension = ("smallest", [best / 10, best / 5, best / 2]) if best == lrs[0] else (
        "largest", [best * 2, best * 5, best * 10])
    extended = " ".join(f"{lr:g}" for lr in sorted(set(lrs) | set(extension)))
    return (f"the best learning rate, {best:g} per 256 images, is the {side} of the grid: the optimum may lie "
            f"beyond it. Extend the grid, e.g. --lrs {extended}")


def format_result(name: str, result: dict, protocol: str, lr_scale: float) -> str:
    """One candidate's table: a row per setting (lr per 256 images and as used), the winner marked."""
    selection = protocol == "grid"
    lines = [f"linear probe, {name}: {'grid, best on validation' if selection else 'DINO protocol'}; "
             f"lr per 256 images, used = that x {lr_scale:g}",
             f"  {'setting':<32} {'lr used':>10}" + (f" {'val top-1':>10}" if selection else "")]
    best = result["best"]["name"]
    for row in result["grid"]:
        line = f"  {row['name']:<32} {row['actual_lr']:10.4g}"
        if selection:
            line += f" {row['val_top1']:10.2f}" + ("  <- best" if row["name"] == best else "")
        lines.append(line)
    lines.append(f"  test top-1 {result['best']['test_top1']:.2f}, top-5 {result['best']['test_top5']:.2f} ({best})")
    lines += [f"  warning: {result['warning']}"] if result.get("warning") else []
    return "\n".join(lines)


def format_comparison(results: dict) -> str:
    """Test top-1 / top-5 of every candidate, side by side."""
    width = max(len(name) for name in results) + 2
    lines = [f"{'test accuracy (%)':<{width}} {'top-1':>8} {'top-5':>8}"]
    lines += [f"  {name:<{width - 2}} {r['best']['test_top1']:8.2f} {r['best']['test_top5']:8.2f}"
              for name, r in results.items()]
    return "\n".join(lines)
