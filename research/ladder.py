"""The learnability ladder: can a recipe teach the embedded backbone to read its memory, from easy to real text?

Each rung trains a fresh CLaRa on the embedded SmolLM2-135M with `clara train` (one arm = one set of arguments) and
then probes held-out rows with `modeling_clara.probing`: the target's cross-entropy reading its own passage's memory
(`ce_gold`) and another passage's (`ce_other`).

| rung | task | stage | passes when |
|---|---|---|---|
| 1 | code word: doc "The code word is W." -> target W (8 single-token words) | pretrain | ce_gold < floor / 2 |
| 2 | which of several facts: 2-4 facts "X's A is V." -> question "What is X's A?" -> V | instruct | ce_gold < floor / 2 |
| 3a / 3b / 3c | real SCP passages, reconstruction (+ QA rows at 3c): doc 64 CR 4, 128 CR 8, 256 CR 16 | pretrain | passage gap >= 0.5 |

The floor of rungs 1-2 is the best cross-entropy without memory: the value is one of K equally likely single tokens,
so `ln K` spread over the target's tokens. Rung 3's reference is the prior (`ce_other`). Rungs 3a-3c keep 16 memory
tokens, so one model can climb them in order (a length curriculum: `clara train` accepts a checkpoint with a new
`doc_max_length`/`compr_rate` when `doc_max_length // compr_rate` stays the same).

    python research/ladder.py --rungs 1 2 --arms apple mse0            # ~10 min per arm and rung on 2 cores
    python research/ladder.py --rungs 3a --arms small --max-steps 300  # ~35 min
    python research/ladder.py --rungs 2 --untrained                    # the untrained model's probe, ~1 min
    python research/ladder.py --rungs 3b --arms small --max-steps 100 \
        --from runs/ladder/rung3a-small-seed0/pretrain                      # the length curriculum: 3b after 3a

Rungs 3a-3c read Apple's SCP sample (`--scp-sample`): they train on the shipped model's training documents and probe
its held-out ones, the passages of the bundled corpus. Results are appended to `<out>/results.jsonl` (a finished
rung/arm is not run again) and printed as a table. research/README.md holds the measured table.
"""

import argparse
import hashlib
import json
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from modeling_clara import ClaraForRAG
from modeling_clara.backbone import resolve_embedded_backbone
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE
from modeling_clara.cli.train import parse_train_args
from modeling_clara.probing import ProbeCase, make_probe_collator, probe_memory_use, probe_row
from modeling_clara.training import train_clara

# The sample the shipped model trained on (examples/shipped_model/prepare_data.py reads the same file).
DEFAULT_SCP_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "clara_pretrain_sample.jsonl"

# Arms differ only in what they name; every arm trains with the same batch and peak learning rate (COMMON_ARGS), the
# loss ablations at a constant rate, the small recipe on its own schedule (constant in stage 1, warmup-stable-decay
# in instruct).
CONSTANT_LR = ["--lr_scheduler_type", "constant"]
ARMS = {
    "apple": CONSTANT_LR,  # Apple's loss: CE + 0.1 * MSE
    "mse0": ["--mse_weight", "0", *CONSTANT_LR],
    # The small recipe: no MSE, random-word channel rows (pretrain), the memory contrast (instruct), the memory-cosine
    # hinge (both).
    "small": ["--recipe", "small"],
    # The small recipe without the memory-cosine hinge (the table's `small` rows measured before the hinge joined it).
    "small_no_hinge": ["--recipe", "small", "--memory_cosine_weight", "0"],
    # No MSE, the memory contrast: each target must cost 1 nat/token less from its own memory than from another row's
    # (compressor and generator both train).
    "contrast": ["--mse_weight", "0", "--memory_contrast_weight", "1", *CONSTANT_LR],
}
COMMON_ARGS = [
    "--lora_r", "8", "--per_device_train_batch_size", "4", "--learning_rate", "5e-4", "--logging_steps", "10",
    "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
]
# Every code word and value is one token of the embedded tokenizer with and without a leading space, so the floor
# is exactly ln K over the target's tokens.
CODE_WORDS = ("apple", "river", "water", "stone", "house", "music", "paper", "light")
NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo")
ATTRIBUTES = {
    "color": ("green", "blue", "black", "white", "brown", "red", "gray", "orange"),
    "animal": ("horse", "cat", "dog", "bird", "fish", "mouse", "lion", "bear"),
    "thing": ("ship", "train", "car", "door", "window", "table", "chair", "book"),
}


@dataclass
class Rung:
    name: str
    stage: str
    doc_max_length: int
    compr_rate: int
    max_steps: int
    train_rows: list[dict]
    cases: list[ProbeCase]
    target: str  # probe target: "passage" or "answer"
    n_choices: int | None = None  # rungs 1-2: equally likely single-token values (the floor)
    answer_cases: list[ProbeCase] = field(default_factory=list)  # rung 3: QA probe besides reconstruction


def code_word_rung(rng: random.Random) -> Rung:
    rows = [{"data_type": "paraphrase", "answers": [w], "docs": [f"The code word is {w}."]} for w in CODE_WORDS] * 40
    rng.shuffle(rows)
    docs = [f"The code word is {w}." for w in CODE_WORDS]
    cases = [ProbeCase("", w, docs[i], docs[(i + 1) % len(docs)]) for i, w in enumerate(CODE_WORDS)]
    return Rung("1", "pretrain", 16, 4, 150, rows, cases, "passage", n_choices=len(CODE_WORDS))


def fact_passage(rng: random.Random) -> tuple[str, str, str]:
    """(passage, question, answer): 2-4 facts about distinct (name, attribute) pairs; the question asks one."""
    pairs = rng.sample([(n, a) for n in NAMES for a in ATTRIBUTES], rng.randint(2, 4))
    facts = [(name, attribute, rng.choice(ATTRIBUTES[attribute])) for name, attribute in pairs]
    name, attribute, value = rng.choice(facts)
    return " ".join(f"{n}'s {a} is {v}." for n, a, v in facts), f"What is {name}'s {attribute}?", value


def facts_rung(rng: random.Random) -> Rung:
    rows = [dict(zip(("docs", "question", "answer"), fact_passage(rng))) for _ in range(480)]
    rows = [{**row, "docs": [row["docs"]]} for row in rows]
    heldout = [fact_passage(rng) for _ in range(41)]
    cases = [ProbeCase(q, a, passage, heldout[i + 1][0]) for i, (passage, q, a) in enumerate(heldout[:-1])]
    return Rung("2", "instruct", 32, 4, 200, rows, cases, "answer", n_choices=len(next(iter(ATTRIBUTES.values()))))


def reconstruction_row(text: str) -> dict:
    """A stage-1 row whose target is its document itself: only the memory can inform it."""
    return {"data_type": "paraphrase", "answers": [text], "docs": [text]}


def first_words(text: str, n_words: int) -> str:
    return " ".join(text.split()[:n_words])


def shipped_split(scp_sample: Path) -> tuple[list[dict], list[dict]]:
    """Apple's SCP sample split as the shipped model's data was: the held-out rows are the bundled corpus's passages
    (in its order), every other row is a training row."""
    bundled = [json.loads(line)["text"] for line in open(SHIPPED_CORPUS_FILE, encoding="utf-8")]
    rows = {row["docs"][0]: row for row in map(json.loads, open(scp_sample, encoding="utf-8"))}
    missing = [text for text in bundled if text not in rows]
    if missing:
        raise ValueError(f"{scp_sample} is not the sample the shipped model trained on: it lacks {len(missing)} of "
                         f"the bundled passages, e.g. {missing[0]!r:.80}")
    heldout = set(bundled)
    return [row for text, row in rows.items() if text not in heldout], [rows[text] for text in bundled]


def passages_rung(name: str, doc_max_length: int, compr_rate: int, n_words: int | None, max_steps: int,
                  scp_sample: Path) -> Rung:
    """Real passages of Apple's SCP sample (the shipped model's split): reconstruction rows of the first `n_words`
    words (whole passages and their QA rows when `n_words` is None); probed on 24 held-out passages."""
    train, heldout = shipped_split(scp_sample)
    if n_words is None:
        rows = train + [reconstruction_row(r["docs"][0]) for r in train]
        texts = [r["docs"][0] for r in heldout]
    else:
        rows = [reconstruction_row(first_words(r["docs"][0], n_words)) for r in train]
        texts = [first_words(r["docs"][0], n_words) for r in heldout]
    random.Random(0).shuffle(rows)
    cases = [ProbeCase("", texts[i], texts[i], texts[i + 1]) for i in range(24)]
    answer_cases = [
        ProbeCase(r["question"][0], r["answers"][0], texts[i], texts[i + 1])
        for i, r in enumerate(heldout[:24])
        if r["answers"][0] in texts[i]  # only questions the compressed part of the passage answers
    ]
    return Rung(name, "pretrain", doc_max_length, compr_rate, max_steps, rows, cases, "passage",
                answer_cases=answer_cases)


def build_rung(name: str, max_steps: int | None, scp_sample: Path = DEFAULT_SCP_SAMPLE) -> Rung:
    rng = random.Random(0)
    rung = {
        "1": lambda: code_word_rung(rng),
        "2": lambda: facts_rung(rng),
        "3a": lambda: passages_rung("3a", 64, 4, 40, 300, scp_sample),
        "3b": lambda: passages_rung("3b", 128, 8, 80, 300, scp_sample),
        "3c": lambda: passages_rung("3c", 256, 16, None, 300, scp_sample),
    }[name]()
    if max_steps is not None:
        rung.max_steps = max_steps
    return rung


def no_memory_floor(model: ClaraForRAG, rung: Rung) -> float | None:
    """`ln K` over the mean number of target tokens of the probe cases (rungs with K single-token values)."""
    if rung.n_choices is None:
        return None
    collator = make_probe_collator(model, rung.target)
    n_tokens = [
        (collator([probe_row(collator, case.question, case.target, case.gold)])["labels"] != -100).sum().item()
        for case in rung.cases
    ]
    return math.log(rung.n_choices) / (sum(n_tokens) / len(n_tokens))


class StopBelowCE(TrainerCallback):
    """Stop once the mean of the last `window` logged training CEs is below `threshold`: the rung is learned, more
    steps only cost time. (One noisy batch under it does not stop a run: rung 2 logs 0.15 between 0.3s.)"""

    def __init__(self, threshold: float, window: int = 3):
        self.threshold = threshold
        self.recent = deque(maxlen=window)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "ce_loss" in logs:
            self.recent.append(logs["ce_loss"])
        if len(self.recent) == self.recent.maxlen and sum(self.recent) / len(self.recent) < self.threshold:
            control.should_training_stop = True


def probe_rung(model: ClaraForRAG, rung: Rung) -> dict:
    """Probe results of a trained model on the rung's held-out cases, and whether it passes."""
    floor = no_memory_floor(model, rung)
    result = {"floor": floor, **probe_memory_use(model, rung.cases, rung.target)}
    if rung.answer_cases:
        answer = probe_memory_use(model, rung.answer_cases, "answer")
        result.update({"answer_gap": answer["gap"], "answer_ce_gold": answer["ce_gold"], "n_answer": len(rung.answer_cases)})
    result["passed"] = result["ce_gold"] < floor / 2 if floor is not None else result["gap"] >= 0.5
    return result


def finished_runtime(trainer_state: dict) -> float | None:
    """A finished run logs its runtime; a checkpoint taken mid-run (`checkpoint-N`) has none."""
    return next((e["train_runtime"] for e in reversed(trainer_state["log_history"]) if "train_runtime" in e), None)


def probe_trained(rung: Rung, arm: str, trained: Path, seed: int) -> dict:
    """A model trained elsewhere with this rung's data and arm (e.g. stage 1 of the shipped model, which is rung 3a's
    `small` arm), probed as the rung probes its own runs."""
    state = json.loads((trained / "trainer_state.json").read_text())
    runtime = finished_runtime(state)
    model = ClaraForRAG.from_pretrained(trained)
    return {"rung": rung.name, "arm": arm, "seed": seed, "steps": state["global_step"], "train_runtime_s": runtime,
            "trained": str(trained), **probe_rung(model, rung)}


def untrained_model(rung: Rung) -> ClaraForRAG:
    """A fresh CLaRa on the embedded backbone with the rung's architecture."""
    return ClaraForRAG.from_backbone("embedded", doc_max_length=rung.doc_max_length, compr_rate=rung.compr_rate)


def probe_untrained(rung: Rung, seed: int) -> dict:
    """The rung's probe on a fresh, untrained CLaRa: the reference each arm starts from."""
    model = untrained_model(rung)
    return {"rung": rung.name, "arm": "untrained", "seed": seed, "steps": 0, "train_runtime_s": 0.0,
            **probe_rung(model, rung)}


def train_stage(rung: Rung, stage: str, rows: list[dict], model: str, run_dir: Path, arm: str, seed: int,
                callbacks: list, max_steps: int) -> dict:
    """One `clara train` run of the rung's arm on `rows`, from `model`, into `run_dir`/`stage`; a stage that finished
    in an earlier, interrupted run of the arm is not trained again."""
    output = run_dir / stage
    if (output / "model.safetensors").exists():
        state = json.loads((output / "trainer_state.json").read_text())
        if state["max_steps"] != max_steps:
            raise ValueError(f"{output} was trained for max_steps={state['max_steps']}, not {max_steps}: use another --out")
        return {"global_step": state["global_step"], "train_runtime": finished_runtime(state)}
    data = run_dir / f"{stage}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    argv = train_argv(rung, stage, model, data, output, arm, seed, max_steps)
    return train_clara(*parse_train_args(argv), callbacks=callbacks)


def train_argv(rung: Rung, stage: str, model: str, data: Path, output: Path, arm: str, seed: int,
               max_steps: int) -> list[str]:
    """The `clara train` arguments of one stage of the arm on the rung."""
    return [
        "--stage", stage, "--model", model, "--data", str(data), "--output_dir", str(output),
        "--doc_max_length", str(rung.doc_max_length), "--compr_rate", str(rung.compr_rate),
        "--max_steps", str(max_steps), "--seed", str(seed), *COMMON_ARGS, *ARMS[arm],
    ]


def trained_steps(output: Path) -> tuple[int, float]:
    """Steps and runtime of a finished `clara train` output (a mid-run checkpoint has no runtime to add to)."""
    state_file = output / "trainer_state.json"
    if not state_file.exists():
        raise ValueError(f"{output} is not a `clara train` output: it has no trainer_state.json")
    state = json.loads(state_file.read_text())
    runtime = finished_runtime(state)
    if runtime is None:
        raise ValueError(f"{output} is a checkpoint taken mid-run: start from a finished `clara train` output")
    return state["global_step"], runtime


def run_arm(rung: Rung, arm: str, out: Path, seed: int, pretrain_steps: int | None = None,
            start_from: Path | None = None) -> dict:
    """Train the arm on the rung from the embedded backbone, or from `start_from` (a finished `clara train` output:
    the length curriculum of rungs 3a -> 3b -> 3c, which keep 16 memory tokens), and probe it."""
    run_dir = out / f"rung{rung.name}-{arm}-seed{seed}"  # a finished stage is reused only for its own seed
    if start_from is not None:  # its own directory: a finished stage trained from elsewhere is not reused for it
        source_id = hashlib.sha1(str(start_from.resolve()).encode()).hexdigest()[:8]
        run_dir = run_dir.with_name(f"{run_dir.name}-from-{source_id}")
    run_dir.mkdir(parents=True, exist_ok=True)
    model = untrained_model(rung)
    floor = no_memory_floor(model, rung)
    del model
    callbacks = [StopBelowCE(floor / 4)] if floor is not None else []
    source, steps, runtime = "embedded", 0, 0.0
    if start_from is not None:
        source, (steps, runtime) = str(start_from), trained_steps(start_from)
    if arm == "small" and rung.stage == "instruct" and pretrain_steps != 0:
        # The small recipe as a pipeline: stage 1 (reconstruction + channel rows) opens the memory, then instruction
        # tuning with the memory contrast trains compressor and generator (the recipe's `instruct` stage).
        reconstruction = [reconstruction_row(doc) for row in rung.train_rows for doc in row["docs"]]
        opened = train_stage(rung, "pretrain", reconstruction, source, run_dir, arm, seed, [],
                             rung.max_steps if pretrain_steps is None else pretrain_steps)
        source, steps, runtime = (str(run_dir / "pretrain"), steps + opened["global_step"],
                                  runtime + opened["train_runtime"])
    train = train_stage(rung, rung.stage, rung.train_rows, source, run_dir, arm, seed, callbacks, rung.max_steps)
    model = ClaraForRAG.from_pretrained(run_dir / rung.stage)
    origin = {"from": str(start_from)} if start_from is not None else {}
    return {"rung": rung.name, "arm": arm, "seed": seed, "steps": steps + train["global_step"],
            "train_runtime_s": runtime + train["train_runtime"], **origin, **probe_rung(model, rung)}


def print_table(results: list[dict]) -> None:
    print("| rung | arm | steps | time (min) | no-memory floor | CE own memory | CE other memory | gap | answer gap | "
          "memory cosine | passed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        floor = f"{r['floor']:.3f}" if r["floor"] is not None else f"(prior {r['ce_other']:.3f})"
        answer = f"{r['answer_gap']:+.3f} (n={r['n_answer']})" if "answer_gap" in r else ""
        minutes = f"{r['train_runtime_s'] / 60:.1f}" if r["train_runtime_s"] is not None else "(checkpoint)"
        arm = f"{r['arm']}, from {r['from']}" if "from" in r else r["arm"]
        print(f"| {r['rung']} | {arm} | {r['steps']} | {minutes} | {floor} | "
              f"{r['ce_gold']:.3f} | {r['ce_other']:.3f} | {r['gap']:+.3f} | {answer} | {r['memory_cosine']:.3f} | "
              f"{'yes' if r['passed'] else 'no'} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rungs", nargs="+", default=["1", "2"], choices=("1", "2", "3a", "3b", "3c"))
    parser.add_argument("--arms", nargs="+", default=["apple", "mse0"], choices=tuple(ARMS))
    parser.add_argument("--max-steps", type=int, default=None, help="override every rung's step budget")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="steps of the small recipe's stage 1 before an instruct rung (default: the rung's budget; "
                             "0: none, the instruct stage trains from the backbone)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scp-sample", type=Path, default=DEFAULT_SCP_SAMPLE,
                        help="Apple's SCP sample (clara_pretrain_sample.jsonl), the data of rungs 3a-3c")
    parser.add_argument("--out", type=Path, default=Path("runs/ladder"))
    parser.add_argument("--trained", type=Path, default=None,
                        help="probe this finished `clara train` output as the (single) rung and arm instead of training")
    parser.add_argument("--untrained", action="store_true",
                        help="probe a fresh, untrained CLaRa on each rung (the arm 'untrained') instead of training")
    parser.add_argument("--from", dest="start_from", type=Path, default=None,
                        help="train from this finished `clara train` output instead of the embedded backbone: the "
                             "length curriculum, e.g. rung 3b from a rung-3a run (both keep 16 memory tokens)")
    args = parser.parse_args(argv)
    if args.trained is not None and len(args.rungs) * len(args.arms) != 1:
        parser.error("--trained probes one run: give one rung and one arm")
    if args.start_from is not None and (args.trained is not None or args.untrained):
        parser.error("--from starts a training run: it cannot go with --trained or --untrained")
    if args.untrained:
        args.arms = ["untrained"]
    resolve_embedded_backbone()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    done = [json.loads(line) for line in results_file.open()] if results_file.exists() else []
    for rung_name in args.rungs:
        rung = build_rung(rung_name, args.max_steps, args.scp_sample)
        for arm in args.arms:
            origin = str(args.start_from) if args.start_from is not None else None
            if any(r["rung"] == rung_name and r["arm"] == arm and r["seed"] == args.seed and r.get("from") == origin
                   for r in done):
                continue
            if args.untrained:
                result = probe_untrained(rung, args.seed)
            elif args.trained is not None:
                result = probe_trained(rung, arm, args.trained, args.seed)
            else:
                result = run_arm(rung, arm, args.out, args.seed, args.pretrain_steps, args.start_from)
            done.append(result)
            with results_file.open("a") as f:
                f.write(json.dumps(result) + "\n")
    print_table([r for r in done if r["rung"] in args.rungs and r["arm"] in args.arms])


if __name__ == "__main__":
    main()
