"""`clara synthesize`: `modeling_clara.synthesis` on the command line, with every `SynthesisConfig` knob an option."""

import argparse
import dataclasses
from pathlib import Path

from .. import synthesis
from ..backbone import EMBEDDED_BACKBONE
from ..synthesis import (
    OUTPUT_FILE,
    LocalGenerator,
    OpenAICompatibleGenerator,
    SynthesisConfig,
    stats_table,
    synthesize,
)
from .options import CORPUS_HELP, add_output_dir_option


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    parser = subparsers.add_parser(
        name, help=help, description=synthesis.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", required=True, help=CORPUS_HELP)
    add_output_dir_option(parser, f"folder of the output: {OUTPUT_FILE} in Apple's stage-1 format, with the run's "
                          "settings and progress", required=True, deprecated="--out", deprecated_dest="output_file")
    parser.add_argument("--generator", default=EMBEDDED_BACKBONE,
                        help="HF causal LM name or path ('embedded': SmolLM2-135M-Instruct), or the served model's "
                        "name with --endpoint")
    parser.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (vLLM)")
    parser.add_argument("--max-workers", type=int, default=8, help="concurrent requests to --endpoint")
    parser.add_argument("--batch-size", type=int, default=4, help="passages per batch")
    parser.add_argument("--generation-batch-size", type=int, default=8, help="prompts per forward pass (local)")
    parser.add_argument("--limit", type=int, help="only the first N passages")
    parser.add_argument("--device", help="local generator's device (default: cuda when available)")
    defaults = SynthesisConfig()
    parser.add_argument("--n-simple", type=int, default=defaults.n_simple)
    parser.add_argument("--n-complex", type=int, default=defaults.n_complex)
    parser.add_argument("--no-paraphrase", dest="paraphrase", action="store_false")
    parser.add_argument("--f1-threshold", type=float, default=defaults.f1_threshold)
    parser.add_argument("--no-closed-book-check", dest="closed_book_check", action="store_false")
    parser.add_argument("--coverage-rounds", type=int, default=defaults.coverage_rounds)
    parser.add_argument("--n-more", type=int, default=defaults.n_more)
    parser.add_argument("--min-paraphrase-ratio", type=float, default=defaults.min_paraphrase_ratio)
    parser.add_argument("--max-paraphrase-f1", type=float, default=defaults.max_paraphrase_f1)
    parser.add_argument("--max-question-words", type=int, default=defaults.max_question_words)
    parser.add_argument("--max-answer-words", type=int, default=defaults.max_answer_words)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--answer-max-new-tokens", type=int, default=defaults.answer_max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = SynthesisConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthesisConfig)})
    if args.endpoint:
        generator = OpenAICompatibleGenerator(args.endpoint, args.generator, max_workers=args.max_workers,
                                              seed=args.seed)
    else:
        generator = LocalGenerator(args.generator, batch_size=args.generation_batch_size, device=args.device)
    output = Path(args.output_dir) / OUTPUT_FILE if args.output_dir else args.output_file
    stats = synthesize(generator, args.corpus, output, config, batch_size=args.batch_size, limit=args.limit)
    print(stats_table(stats))
    return 0
