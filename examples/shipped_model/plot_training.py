"""Loss curves of the shipped model's training stages (1a, 1b, 2, 2c, 3), from each stage's `trainer_state.json`, as one PNG.

    python examples/shipped_model/plot_training.py --runs runs/shipped --out docs/figures/shipped_training.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGES = (
    ("stage1a", "stage 1a: pretrain, doc 64 / CR 4"),
    ("stage1b", "stage 1b: pretrain, doc 256 / CR 16"),
    ("stage2", "stage 2: instruct"),
    ("stage2c", "stage 2c: instruct + memory contrast"),
    ("stage3", "stage 3: end to end"),
)


def curves(state_file: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Training CE / retrieval loss and eval loss by step."""
    history = json.loads(state_file.read_text())["log_history"]
    series = {}
    for key in ("ce_loss", "memory_contrast_loss", "retrieval_loss", "eval_ce_loss", "eval_retrieval_recall"):
        points = [(entry["step"], entry[key]) for entry in history if key in entry and "train_runtime" not in entry]
        if points:
            series[key] = tuple(map(list, zip(*points)))
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/shipped"))
    parser.add_argument("--out", type=Path, default=Path("docs/figures/shipped_training.png"))
    args = parser.parse_args()

    figure, axes = plt.subplots(1, len(STAGES), figsize=(5 * len(STAGES), 3.6))
    for axis, (folder, title) in zip(axes, STAGES):
        for key, (steps, values) in curves(args.runs / folder / "trainer_state.json").items():
            style = "o--" if key.startswith("eval") else "-"
            axis.plot(steps, values, style, label=key)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
