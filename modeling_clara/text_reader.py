"""A fine-tuned text reader: CLaRa's backbone with its own LoRA, trained on CLaRa's stage-2 rows with the passages as
text. `clara eval --method text_reader --text-reader DIR` compares it with CLaRa, which reads the same passages as
memory: both learned the same answer format from the same rows, so their difference is what compression costs.

Training rows are stage-2 (`instruct`) JSONL rows, `question`, `docs`, `answer`: the reader reads the first `top_k`
docs, each cut to the CLaRa's `doc_max_length` tokens (what its compressor reads), in CLaRa's answer prompt
([`text_prompt`]); the loss is the answer's cross-entropy (prompt tokens masked, as in CLaRa's training). The LoRA is
CLaRa's (`lora_r`, alpha 2r, dropout 0.1, every linear layer). Any `TrainingArguments` option works, checkpoints and
`--resume_from_checkpoint` included:

    python -m modeling_clara.text_reader --model modeling_clara/shipped/clara-smollm2-135m \\
        --data runs/shipped/data/stage2_instruct.jsonl --output_dir runs/text_reader --top_k 2 \\
        --per_device_train_batch_size 16 --learning_rate 2e-4 --lr_scheduler_type constant --max_steps 254 \\
        --group_by_length true

`--group_by_length true` (transformers 5: `--train_sampling_strategy group_by_length`) batches rows of similar length:
on the shipped rows, random batches of 4 compute 1.11 padded tokens per real one, length groups 1.00.
"""

import sys
from dataclasses import dataclass, field

import datasets
import torch
from peft import PeftModel, get_peft_model
from transformers import HfArgumentParser, PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .backbone import load_backbone, resolve_backbone_path
from .data import ClaraCollator
from .jsonl import read_jsonl
from .loading import load_model
from .modeling_clara import ClaraForRAG
from .processing_clara import SYSTEM_PROMPT_ANSWER

logger = logging.get_logger(__name__)


def text_user_turn(question: str, passages: list[str]) -> str:
    """The user turn of CLaRa's answer prompt with the passages as text (one per line) where its memory slots stand;
    no passages: `Question:{question}` alone (closed book)."""
    user = f"Question:{question}"
    if passages:
        user = "Background:\n" + "\n".join(passages) + "\n\n" + user
    return user


def truncate_passage(tokenizer, text: str, max_tokens: int) -> str:
    """The first `max_tokens` tokens of a passage: a text reader reads what CLaRa's compressor reads
    (`doc_max_length`)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def load_instruct_rows(path: str) -> datasets.Dataset:
    """Stage-2 rows (`question`, `docs`, `answer`), checked; a malformed row is an error naming its line."""
    rows = []
    for line_number, record in read_jsonl(path):
        question, docs, answer = record.get("question"), record.get("docs"), record.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str) or not isinstance(docs, list) or not docs:
            raise ValueError(f"{path}:{line_number}: a text-reader row needs str `question`, str `answer` and a "
                             f"non-empty list `docs`, got keys {sorted(record)}")
        rows.append({"question": question, "docs": docs, "answer": answer})
    return datasets.Dataset.from_list(rows)


@dataclass
class TextReaderCollator(ClaraCollator):
    """Causal-LM inputs of the text reader: CLaRa's answer prompt over the first `top_k` docs as text, labels on the
    answer turn only (the base collator's masking)."""

    top_k: int = 2

    def prompt_and_conversation(self, row: dict) -> tuple[str, str]:
        """The generation prompt and the whole conversation (answer included) of one row."""
        tokenizer, limit = self.processor.tokenizer, self.processor.doc_max_length
        passages = [truncate_passage(tokenizer, doc, limit) for doc in row["docs"][: self.top_k]]
        return self.processor.apply_chat_template(SYSTEM_PROMPT_ANSWER, text_user_turn(row["question"], passages),
                                                  row["answer"])

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        inputs = self._decoder_inputs([self.prompt_and_conversation(row) for row in rows])
        labels = inputs["labels"]
        # Only positions that predict an answer token go through the LM head (`logits_to_keep`, with the targets
        # already shifted): the prompt's logits, most of the sequence times a 49k vocabulary, would be thrown away.
        predicting = (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(1)
        return {"input_ids": inputs["dec_input_ids"], "attention_mask": inputs["dec_attention_mask"],
                "labels": labels, "logits_to_keep": predicting, "shift_labels": labels[:, predicting + 1]}


def bare_backbone(clara: ClaraForRAG) -> PreTrainedModel:
    """A fresh fp32 copy of the CLaRa's backbone, without its adapters, from where the CLaRa loads it."""
    path = resolve_backbone_path(clara.config.decoder_model_name, str(clara.name_or_path))
    return load_backbone(path, clara.config, torch_dtype=torch.float32)


def new_text_reader(clara: ClaraForRAG) -> PeftModel:
    """The backbone with a fresh LoRA of the CLaRa's configuration, the only trainable weights."""
    return get_peft_model(bare_backbone(clara), clara.lora_config)


def load_text_reader(clara: ClaraForRAG, path: str) -> PreTrainedModel:
    """A trained text reader (the adapter folder `path` over the CLaRa's backbone), merged, in eval mode, on the
    CLaRa's device."""
    reader = PeftModel.from_pretrained(bare_backbone(clara), path).merge_and_unload()
    return reader.to(clara.device).eval()


def groups_by_length(training_args: TrainingArguments) -> bool:
    """Whether the Trainer batches rows by length: `--group_by_length true` (transformers 4) or
    `--train_sampling_strategy group_by_length` (transformers 5)."""
    strategy = getattr(training_args, "train_sampling_strategy", None)
    return bool(getattr(training_args, "group_by_length", False)) or strategy in ("group_by_length", "batch_rebalance")


def example_length(collator: TextReaderCollator, row: dict) -> int:
    """Tokens of one training example (`--group_by_length`'s key)."""
    _, conversation = collator.prompt_and_conversation(row)
    tokens = collator.processor.tokenizer(conversation, add_special_tokens=False)["input_ids"]
    return min(len(tokens), collator.max_length)


@dataclass
class TextReaderArguments:
    model: str = field(metadata={"help": "the CLaRa whose backbone, tokenizer, prompt and LoRA size the reader takes"})
    data: str = field(metadata={"help": "stage-2 JSONL: question, docs, answer"})
    top_k: int = field(default=2, metadata={"help": "docs read per question (the first top_k of each row)"})
    max_length: int = field(default=2048, metadata={"help": "tokens per training example"})


def train_text_reader(reader_args: TextReaderArguments, training_args: TrainingArguments) -> PeftModel:
    """Train a text reader with the `Trainer` (resuming from `training_args.resume_from_checkpoint`; `latest`: the
    newest checkpoint in `output_dir`, if any) and save its adapter in `output_dir`."""
    clara = load_model(reader_args.model)
    reader = new_text_reader(clara)
    collator = TextReaderCollator(clara.processor, reader_args.max_length, top_k=reader_args.top_k)
    training_args.remove_unused_columns = False
    rows = load_instruct_rows(reader_args.data)
    if groups_by_length(training_args):  # batches of similar length: less padding to compute
        rows = rows.add_column(training_args.length_column_name, [example_length(collator, row) for row in rows])
    trainer = Trainer(model=reader, args=training_args, train_dataset=rows, data_collator=collator)
    resume = training_args.resume_from_checkpoint
    if resume == "latest":
        resume = get_last_checkpoint(training_args.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return reader


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser((TextReaderArguments, TrainingArguments), description=__doc__)
    reader_args, training_args = parser.parse_args_into_dataclasses(argv)
    train_text_reader(reader_args, training_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
