"""Figures and markdown tables from `clara eval` summaries and the efficiency benchmark's JSON.

    python benchmarks/plot_results.py --results eval_results --efficiency docs/results/efficiency.json \\
        --out docs/figures --tables docs/results/tables.md

- `f1_vs_compression.png`: CLaRa's F1 (mean over datasets) against the compression rate, Normal and Oracle,
  with the text-RAG, text-oracle and closed-book lines of the same backbone.
- `latency_vs_compression.png`: generation time per question and context length against the compression rate,
  with the text-RAG lines.
- The tables: per dataset and method, F1 / EM / Cover-EM under Apple's protocol and the max-over-answers one,
  and Recall@1/3/5 of every ranking (`clara eval-retrieval` runs included).
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from modeling_clara.evaluation import collect_summaries  # noqa: E402

BASELINES = {  # method -> (label, line style)
    "text_rag_minilm": ("text RAG, MiniLM top-k", "--"),
    "text_rag_bm25": ("text RAG, BM25 top-k", ":"),
    "text_oracle": ("text oracle", "-."),
    "closed_book": ("closed book", (0, (1, 3))),
}
BASELINE_COLORS = {"text_rag_minilm": "C1", "text_rag_bm25": "C2", "text_oracle": "C3", "closed_book": "gray"}
METHOD_LABELS = {"clara": "CLaRa", "clara_wrong_memory": "CLaRa, wrong memory (control)", **{m: label for m, (label, _) in BASELINES.items()}}


def load_summaries(folders: list[Path]) -> list[dict]:
    """Summaries of every folder; a run found twice (same dataset, method, setting, k, CR, model) counts once."""
    seen, summaries = set(), []
    for folder in folders:
        for s in collect_summaries(folder):
            key = (s["dataset"], s["method"], s.get("setting"), s.get("k"), s.get("ranking"), s.get("compr_rate"),
                   s.get("model"))
            if key not in seen:
                seen.add(key)
                summaries.append(s)
    return summaries


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plot_f1_vs_compression(summaries: list[dict], path: Path, metric: str = "apple_f1") -> None:
    answer_runs = [s for s in summaries if s["method"] != "retrieval"]
    datasets = sorted({s["dataset"] for s in answer_runs})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, setting in zip(axes, ("normal", "oracle")):
        by_rate = defaultdict(list)
        for s in answer_runs:
            if s["method"] == "clara" and s["setting"] == setting:
                by_rate[s["compr_rate"]].append(s[metric])
        rates = sorted(r for r, v in by_rate.items() if len(v) == len(datasets))  # only rates run on every dataset
        if rates:
            ax.plot(rates, [_mean(by_rate[r]) for r in rates], "o-", color="C0", lw=2, label="CLaRa")
        for method, (label, style) in BASELINES.items():
            values = [s[metric] for s in answer_runs if s["method"] == method and s["setting"] in (setting, "none")]
            if method == "text_oracle" and setting == "normal":
                continue
            if len(values) == len(datasets):
                ax.axhline(_mean(values), ls=style, color=BASELINE_COLORS[method], label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(rates or [4, 16, 32, 128], [str(r) for r in rates or [4, 16, 32, 128]])
        ax.set_xlabel("compression rate (document tokens per memory token)")
        ax.set_title(f"{setting.capitalize()} setting")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} (%), mean over datasets")
    fig.suptitle(f"same backbone; datasets: {', '.join(datasets)}", fontsize=9)
    axes[1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency_vs_compression(efficiency: dict, path: Path) -> None:
    summary = efficiency["summary"]
    rates = sorted(int(m.split("-")[1]) for m in summary if m.startswith("clara-"))
    clara = [summary[f"clara-{r}"] for r in rates]
    text = summary["text"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(rates, [s["generate_s_median"] for s in clara], "o-", color="C0", label="CLaRa: generate (precompressed)")
    left.plot(rates, [s["compress_generate_s_median"] for s in clara], "s-", color="C1", label="CLaRa: compress + generate")
    left.plot(rates, [s["prefill_s_median"] for s in clara], "^-", color="C2", label="CLaRa: first token")
    left.axhline(text["generate_s_median"], ls="--", color="C0", label="text RAG: generate")
    left.axhline(text["prefill_s_median"], ls="--", color="C2", label="text RAG: first token")
    left.set_ylabel("seconds per question (median)")
    left.set_ylim(bottom=0)
    right.plot(rates, [s["context_tokens_median"] for s in clara], "o-", color="C0", label="CLaRa")
    right.axhline(text["context_tokens_median"], ls="--", color="C3", label="text RAG")
    right.set_ylabel("tokens fed to the generator (median)")
    right.set_ylim(bottom=0)
    settings = efficiency["settings"]
    for ax, title in ((left, "latency"), (right, "context length")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(rates, [str(r) for r in rates])
        ax.set_xlabel("compression rate")
        ax.set_title(f"{title}: k={settings['k']}, {settings['max_new_tokens']} new tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def answer_table(summaries: list[dict], keys=("apple_f1", "apple_em", "apple_cover_em")) -> str:
    """Rows: method, setting, CR, ranking, k; columns: datasets and their mean; cells `F1 / EM / CEM` (the given keys)."""
    runs = [s for s in summaries if s["method"] != "retrieval"]
    datasets = sorted({s["dataset"] for s in runs})
    rows = defaultdict(dict)
    for s in runs:
        rows[(s["method"], s["setting"], s.get("compr_rate"), s.get("ranking"), s.get("k"))][s["dataset"]] = s
    order = list(METHOD_LABELS)
    header = ["method", "setting", "CR", "ranking", "k", "n", *datasets, "mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, setting, rate, ranking, k), cells in sorted(
        rows.items(), key=lambda item: (order.index(item[0][0]), item[0][1], item[0][2] or 0, item[0][4] or 0)
    ):
        values = [" / ".join(f"{cells[d][k]:.1f}" for k in keys) if d in cells else "–" for d in datasets]
        complete = len(cells) == len(datasets)
        mean = " / ".join(f"{_mean([cells[d][k] for d in datasets]):.1f}" for k in keys) if complete else "–"
        n = "/".join(str(cells[d]["n"]) for d in datasets if d in cells)
        lines.append(f"| {METHOD_LABELS[method]} | {setting} | {rate or '–'} | {ranking or '–'} | {k or '–'} | {n} | "
                     + " | ".join(values) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def recall_table(summaries: list[dict]) -> str:
    """Rows: ranking (+ CR for CLaRa); columns: datasets; cells R@1 / R@3 / R@5. Retrieval runs first."""
    rows, datasets = defaultdict(dict), sorted({s["dataset"] for s in summaries})
    for s in sorted(summaries, key=lambda s: s["method"] != "retrieval"):  # eval-retrieval runs take precedence
        if s.get("recall@1") is None:
            continue
        key = (s["ranking"], s.get("compr_rate") if s["ranking"] == "clara" else None)
        rows[key].setdefault(s["dataset"], s)
    header = ["ranking", "CR", *datasets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (ranking, rate), cells in sorted(rows.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        values = [" / ".join(f"{cells[d][f'recall@{k}']:.1f}" for k in (1, 3, 5)) if d in cells else "–" for d in datasets]
        label = "CLaRa query reasoner" if ranking == "clara" else ranking
        lines.append(f"| {label} | {rate or '–'} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def efficiency_table(efficiency: dict) -> str:
    summary = efficiency["summary"]
    text = summary["text"]
    header = ["method", "CR", "context tokens", "first token s", "generate s", "compress s", "compress+generate s",
              "tokens CLaRa/text", "first token CLaRa/text", "generate CLaRa/text", "compress+generate CLaRa/text"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, s in summary.items():
        lines.append(
            f"| {'text RAG' if method == 'text' else 'CLaRa'} | {'–' if method == 'text' else method.split('-')[1]} | "
            f"{s['context_tokens_median']:.0f} | {s['prefill_s_median']:.3f} | {s['generate_s_median']:.3f} | "
            f"{s['compress_s_median']:.3f} | {s['compress_generate_s_median']:.3f} | "
            f"{s['context_tokens_median'] / text['context_tokens_median']:.3f} | "
            f"{s['prefill_s_median'] / text['prefill_s_median']:.2f} | "
            f"{s['generate_s_median'] / text['generate_s_median']:.2f} | "
            f"{s['compress_generate_s_median'] / text['generate_s_median']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, nargs="+", default=[Path("eval_results")])
    parser.add_argument("--efficiency", type=Path, default=None, help="JSON written by bench_efficiency.py --output")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--metric", default="apple_f1")
    parser.add_argument("--tables", type=Path, default=None, help="also write the markdown tables here")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    summaries = load_summaries(args.results)
    sections = []
    if summaries:
        plot_f1_vs_compression(summaries, args.out / "f1_vs_compression.png", args.metric)
        sections += [
            "### Answers, Apple's protocol (first gold answer): F1 / EM / Cover-EM\n\n" + answer_table(summaries),
            "### Answers, max over accepted answers: F1 / EM / Cover-EM\n\n" + answer_table(summaries, ("f1", "em", "cover_em")),
            "### Retrieval: Recall@1 / @3 / @5\n\n" + recall_table(summaries),
        ]
    if args.efficiency:
        efficiency = json.loads(args.efficiency.read_text())
        plot_latency_vs_compression(efficiency, args.out / "latency_vs_compression.png")
        sections.append("### Efficiency (medians per question)\n\n" + efficiency_table(efficiency))
    tables = "\n".join(sections)
    if args.tables:
        args.tables.parent.mkdir(parents=True, exist_ok=True)
        args.tables.write_text(tables)
    print(tables)


if __name__ == "__main__":
    main()
