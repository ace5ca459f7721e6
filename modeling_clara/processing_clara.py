"""CLaRa's inputs: the tokenizer with CLaRa's special tokens, Apple's prompts, `ClaraProcessor`, and the checks of
the texts and counts users pass to the model and the index.

The processor lays out encoder inputs (documents and queries) and generator prompts exactly as Apple's reference code
does; `tests/test_conformance.py` compares token ids with recorded ones. Shipped with a saved checkpoint beside
`modeling_clara.py` (`trust_remote_code`), so it imports only torch, transformers (and jinja2, which chat templates
need) and sibling files.
"""

import json
import os
import random

import torch
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging

from .configuration_clara import ClaraConfig

logger = logging.get_logger(__name__)

# Prompts, verbatim from Apple's code: the trained checkpoints expect exactly these strings.
SYSTEM_PROMPT_ANSWER = (
    "You are a helpful assistant. Your task is to extract relevant information from provided documents and to "
    "answer to questions as briefly as possible."
)
SYSTEM_PROMPT_QA = (
    "You are a helpful assistant. Given a document, your task is to generate some single questions to cover all "
    "key information of the document and answer them sequentially."
)
SYSTEM_PROMPT_PARAPHRASE = (
    "You are a helpful assistant. Your task is follow the instructions to paraphrase the background information."
)
PARAPHRASE_INSTRUCTIONS = (
    "Background: {docs} means the same as",
    "Background: {docs} Can you put the above sentences in your own terms?",
    "Background: {docs} Please provide a reinterpretation of the preceding background text.",
    "These two expressions are equivalent in essence:\n(1) {docs}\n(2)",
    "Background: {docs} is a paraphrase of what?",
    "Background: {docs} Could you give me a different version of the background sentences above?",
    "In other words, background: {docs} is just another way of saying:",
    "You're getting across the same point whether you say background: {docs} or",
    "Background: {docs} After unpacking the ideas in the background information above, we got:",
    "Background: {docs} Please offer a restatement of the background sentences I've just read.",
    "Background: {docs}, which also means:",
    "Strip away the mystery, and you'll find background: {docs} is simply another rendition of:",
    "The essence of background: {docs} is captured again in the following statement:",
)
PROMPT_TASKS = ("answer", "qa", "paraphrase")
# Apple truncates decoder prompts at this many tokens at inference.
MAX_PROMPT_TOKENS = 1024
# What a causal LM takes. `PreTrainedTokenizerFast` of transformers 4 would also return `token_type_ids` (the named
# Llama/GPT-2 classes do not), which `generate` rejects.
CAUSAL_LM_INPUT_NAMES = ["input_ids", "attention_mask"]


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A backbone's or checkpoint's tokenizer, the same on transformers 4 and 5.

    A local folder with a `tokenizer.json` loads it verbatim as a `PreTrainedTokenizerFast`, as transformers 4's
    fast classes do. transformers 5 instead rebuilds named classes such as `LlamaTokenizer` from the vocabulary and
    gets byte-level BPE tokenizers saved under that name wrong (5.19 drops the spaces). Anything else (a Hub id, a
    folder without tokenizer.json) goes through `AutoTokenizer`.
    """
    if os.path.isfile(os.path.join(name_or_path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(name_or_path, model_input_names=CAUSAL_LM_INPUT_NAMES)
    return AutoTokenizer.from_pretrained(name_or_path, use_fast=True)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, save_directory: str | os.PathLike) -> None:
    """Save `tokenizer` so that transformers 4 and 5 load the same tokenizer from it, with `AutoTokenizer` too.

    tokenizer_config.json names `PreTrainedTokenizerFast` (tokenizer.json verbatim on either stack; 5's own
    `TokenizersBackend` does not exist in 4), lists the added special tokens as `additional_special_tokens` (4 cannot
    read 5's list-valued `extra_special_tokens`) and turns decode-time space clean-up off (4 applies it, 5 skips it
    for BPE, so decoded text would differ).
    """
    tokenizer.save_pretrained(save_directory)
    path = os.path.join(save_directory, "tokenizer_config.json")
    if not os.path.isfile(os.path.join(save_directory, "tokenizer.json")):
        return  # a slow-only tokenizer: nothing that either stack could rebuild differently
    with open(path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    if isinstance(tokenizer_config.get("extra_special_tokens"), list):
        del tokenizer_config["extra_special_tokens"]
    for key in ("additional_special_tokens", "backend", "is_local", "local_files_only"):  # the last three: 5's
        tokenizer_config.pop(key, None)
    tokenizer_config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                            model_input_names=list(tokenizer.model_input_names))
    if additional := additional_special_tokens(tokenizer):
        tokenizer_config["additional_special_tokens"] = additional
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def additional_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's added special tokens: `additional_special_tokens` in transformers 4, `extra_special_tokens`
    in 5 (in 4 that name is a dict of named model-specific tokens)."""
    tokens = getattr(tokenizer, "additional_special_tokens", None)
    if tokens is None:
        tokens = getattr(tokenizer, "extra_special_tokens", None)
    return [str(token) for token in tokens] if isinstance(tokens, (list, tuple)) else []


def add_clara_special_tokens(tokenizer: PreTrainedTokenizerBase, n_mem_tokens: int, different_mem_tokens: bool) -> None:
    """Add `<MEM..>`, `<AE>`, `<ENC>`, `<SEP>` (in Apple's order, so ids match) and left padding (pad = bos if none)."""
    mem_tokens = memory_token_strings(n_mem_tokens, different_mem_tokens)
    existing = additional_special_tokens(tokenizer)
    new_tokens = [t for t in dict.fromkeys(mem_tokens) if t not in existing] + [
        t for t in ("<AE>", "<ENC>", "<SEP>") if t not in existing
    ]
    if new_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": existing + new_tokens})
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.bos_token_id


def memory_token_strings(n_mem_tokens: int, different_mem_tokens: bool) -> list[str]:
    if different_mem_tokens:
        return [f"<MEM{i}>" for i in range(n_mem_tokens)]
    return ["<MEM>"] * n_mem_tokens


class ClaraProcessor:
    """Builds CLaRa's token inputs: encoder layouts for documents and queries, and generator prompts.

    Holds only the tokenizer and plain values (no model), so data collators can carry it into DataLoader workers.
    Every layout reproduces Apple's code; `tests/test_conformance.py` compares token ids with recorded ones.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: ClaraConfig):
        self.tokenizer = tokenizer
        self.doc_max_length = config.doc_max_length
        self.n_mem_tokens = config.n_mem_tokens
        self.sep = config.sep
        self.mem_tokens = memory_token_strings(config.n_mem_tokens, config.different_mem_tokens)
        self.mem_token_ids = tokenizer.convert_tokens_to_ids(self.mem_tokens)
        self.enc_token_id = tokenizer.convert_tokens_to_ids("<ENC>")
        self.sep_token_id = tokenizer.convert_tokens_to_ids("<SEP>")
        self.ae_token_id = tokenizer.convert_tokens_to_ids("<AE>")
        # Every layout is built as token ids (memory slots, Apple's prompts) and padded after, so transformers 4's
        # advice to encode and pad in one `__call__` cannot apply; recorded as given, it is not printed.
        tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
        if tokenizer.bos_token is None or tokenizer.eos_token is None:
            raise ValueError(
                f"CLaRa's encoder layout needs bos and eos tokens; the tokenizer has bos={tokenizer.bos_token!r}, "
                f"eos={tokenizer.eos_token!r}. Set them on the tokenizer before building the model."
            )

    @property
    def encoder_length(self) -> int:
        """Encoder sequence length: `<ENC>` + bos + document (+ eos) padded to doc_max_length + 3, then memory tokens."""
        return self.doc_max_length + 3 + self.n_mem_tokens

    def encode_documents(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], int]:
        """Encoder inputs for documents or queries.

        Layout: `<ENC>` + bos + text + eos, tokenized without special tokens, truncated on the right and left-padded
        to `doc_max_length + 3`, then the memory tokens. Truncation cuts the eos, as in Apple's code.

        Returns:
            `(inputs, n_truncated)`: `input_ids` and `attention_mask` of shape `(n_texts, encoder_length)`, and
            how many texts were longer than `doc_max_length + 3` tokens.
        """
        max_length = self.doc_max_length + 3
        tok = self.tokenizer
        wrapped = [f"<ENC>{tok.bos_token}{text}{tok.eos_token}" for text in texts]
        ids = tok(wrapped, add_special_tokens=False)["input_ids"]
        n_truncated = sum(len(seq) > max_length for seq in ids)
        padded = tok.pad(
            {"input_ids": [seq[:max_length] for seq in ids]},
            padding="max_length",
            max_length=max_length,
            return_tensors="pt",
        )
        memory = torch.tensor(self.mem_token_ids, dtype=torch.long).expand(len(texts), -1)
        input_ids = torch.cat([padded["input_ids"], memory], dim=1)
        attention_mask = torch.cat([padded["attention_mask"], torch.ones_like(memory)], dim=1)
        return {"input_ids": input_ids, "attention_mask": attention_mask}, n_truncated

    def report_truncation(self, n_truncated: int, n_texts: int, what: str) -> None:
        """One summary per compress call (not per batch): cutting texts to the length the model compresses is what
        CLaRa does, so it is info, with what keeps every word."""
        if n_truncated:
            length = self.doc_max_length
            logger.info(
                f"{n_truncated} of {n_texts} {what} are longer than doc_max_length={length} tokens and were cut to "
                f"their first {length} (the length this model compresses; split longer texts into passages to keep "
                "all of them)"
            )

    def document_slots(self, n_docs: int) -> str:
        """The prompt text that holds `n_docs` compressed documents: memory tokens + `<SEP>`, per document."""
        return ("".join(self.mem_tokens) + "<SEP>") * n_docs

    def build_prompt(
        self,
        n_docs: int,
        task: str = "answer",
        question: str | list[str] = "",
        answer: str | list[str] | None = None,
        paraphrase_instruction: int | None = None,
    ) -> tuple[str, str | None]:
        """Chat prompt for the generator, with `n_docs` document slots.

        Args:
            n_docs (`int`): Document slots to write.
            task (`str`): `"answer"` (instruction tuning / end to end), `"qa"` (stage-1 QA: `question` and
                `answer` are lists of pairs) or `"paraphrase"` (stage-1 paraphrase; `question` is ignored).
            answer: Target text; when given the full conversation is returned too.
            paraphrase_instruction (`int`, *optional*): Which of Apple's 13 paraphrase instructions to use;
                default `random.choice`, as Apple does.
        Returns:
            `(prompt, conversation)`: the generation prompt, and the prompt followed by the answer turn (or
            `None` without an answer). Loss is on the conversation tokens after the prompt's length.
        """
        docs = self.document_slots(n_docs)
        if task == "answer":
            system, user = SYSTEM_PROMPT_ANSWER, f"Background:\n{docs}\n\nQuestion:{question}"
        elif task == "qa":
            system, user = SYSTEM_PROMPT_QA, f"Background:\n{docs}"
            if answer is not None:
                answer = "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(question, answer))
        elif task == "paraphrase":
            instruction = (
                random.choice(PARAPHRASE_INSTRUCTIONS)
                if paraphrase_instruction is None
                else PARAPHRASE_INSTRUCTIONS[paraphrase_instruction]
            )
            system, user = SYSTEM_PROMPT_PARAPHRASE, instruction.format(docs=docs)
        else:
            raise ValueError(f"task={task!r} is not one of {PROMPT_TASKS}")
        return self.apply_chat_template(system, user.replace(":\\ ", ": "), answer)

    def apply_chat_template(self, system: str, user: str, answer: str | None = None) -> tuple[str, str | None]:
        """`(prompt, conversation)` for a system and a user turn in the tokenizer's chat template (see `build_prompt`);
        text prompts for the bare backbone use it too, so they match CLaRa's prompts but for the document slots."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        try:
            return self._render(messages, answer)
        except TemplateError as error:
            # Reproduces ml-clara: templates without a system role get one merged user turn.
            if "System role not supported" not in str(error):
                raise
            return self._render([{"role": "user", "content": f"{system}\n{user}"}], answer)

    def _render(self, messages: list[dict], answer: str | None) -> tuple[str, str | None]:
        render = self.tokenizer.apply_chat_template
        prompt = render(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        if answer is None:
            return prompt, None
        conversation = messages + [{"role": "assistant", "content": answer}]
        return prompt, render(conversation, tokenize=False, add_generation_prompt=False, enable_thinking=False)

    def tokenize_prompts(self, prompts: list[str], max_length: int = MAX_PROMPT_TOKENS) -> dict[str, torch.Tensor]:
        """Left-padded generator inputs, without special tokens; prompts longer than `max_length` are an error
        ([`PromptTooLongError`])."""
        return self.tokenizer.pad({"input_ids": self.prompt_ids(prompts, max_length)}, padding="longest",
                                  return_tensors="pt")

    def prompt_ids(self, prompts: list[str], max_length: int = MAX_PROMPT_TOKENS) -> list[list[int]]:
        """Token ids of generator prompts, without special tokens: the one check of the generator's prompt length.

        Raises:
            [`PromptTooLongError`]: naming every prompt longer than `max_length` tokens.
        """
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        too_long = {i: len(seq) for i, seq in enumerate(ids) if len(seq) > max_length}
        if too_long:
            raise PromptTooLongError(too_long, max_length)
        return ids

    def answer_prompt_start(self) -> list[int]:
        """The tokens every answer prompt starts with: the chat template's turns up to the first document slot."""
        ids = self.prompt_ids([self.build_prompt(1, task="answer", question="")[0]])[0]
        return ids[: ids.index(self.mem_token_ids[0])]

    def pad_after_start(self, start: list[int], prompts_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask`, `(n, seq)` each, laid out as `start`, left padding, the rest of each prompt.

        Every row keeps `start` at positions 0..len(start)-1, so one cache of `start` serves the whole batch; the
        attention mask numbers each row's positions as in the plain left-padded layout ([`tokenize_prompts`]).
        """
        if any(ids[: len(start)] != start for ids in prompts_ids):
            raise ValueError("a prompt does not start with the given start of the prompt template")
        rest = self.tokenizer.pad({"input_ids": [ids[len(start) :] for ids in prompts_ids]}, padding="longest",
                                  return_tensors="pt")
        start_ids = torch.tensor(start, dtype=rest["input_ids"].dtype).expand(len(prompts_ids), -1)
        return {
            "input_ids": torch.cat([start_ids, rest["input_ids"]], dim=1),
            "attention_mask": torch.cat([torch.ones_like(start_ids), rest["attention_mask"]], dim=1),
        }


class PromptTooLongError(ValueError):
    """Generator prompts longer than the generator takes: `lengths` maps each one's position to its token count."""

    def __init__(self, lengths: dict[int, int], max_length: int):
        self.lengths, self.max_length = lengths, max_length
        first, n_tokens = next(iter(lengths.items()))
        super().__init__(
            f"prompt {first} has {n_tokens} tokens, more than max_length={max_length}; shorten the question or read "
            "fewer documents"
        )


# --------------------------------------------------------------------------------------------------------------
# Input checks: a bad argument fails where the user passed it, naming it


def check_texts(texts, name: str) -> list[str]:
    """`texts` as a list of non-empty str (one str is a list of one); anything else is an error naming `name`."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise TypeError(f"`{name}` must be a str or a non-empty list of str, got {texts!r:.80}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"`{name}[{i}]` must be a str, got {type(text).__name__}: {text!r:.80}")
        if not text.strip():
            raise ValueError(f"`{name}[{i}]` is empty or whitespace-only: {text!r:.80}")
    return list(texts)


def check_questions_and_embeds(
    questions, doc_embeds, n_mem_tokens: int, hidden_size: int
) -> tuple[list[str], list[torch.Tensor]]:
    """Questions and their compressed documents as lists, one `(n_docs, n_mem_tokens, hidden_size)` floating-point
    tensor per question (one str and one tensor are a list of one; a 4-d tensor is one entry per question)."""
    if isinstance(questions, str):
        questions, doc_embeds = [questions], [doc_embeds]
    questions = check_texts(questions, "questions")
    if isinstance(doc_embeds, torch.Tensor) and doc_embeds.dim() == 4:
        doc_embeds = list(doc_embeds)
    if not isinstance(doc_embeds, (list, tuple)):
        raise TypeError(
            f"`doc_embeds` must be a tensor (one question) or a list of tensors (one per question), "
            f"got {type(doc_embeds).__name__}"
        )
    if len(doc_embeds) != len(questions):
        raise ValueError(f"got {len(questions)} questions but {len(doc_embeds)} doc_embeds entries")
    for position, embeds in enumerate(doc_embeds):
        _check_doc_embeds(embeds, f"doc_embeds[{position}]", (n_mem_tokens, hidden_size))
    return questions, list(doc_embeds)


def _check_doc_embeds(embeds, where: str, expected: tuple[int, int]) -> None:
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(embeds).__name__}")
    if embeds.dim() != 3 or tuple(embeds.shape[1:]) != expected:
        raise ValueError(
            f"{where} has shape {tuple(embeds.shape)}; expected (n_docs, {expected[0]}, {expected[1]}) = "
            "(documents, n_mem_tokens, hidden_size) as returned by `compress`"
        )
    if embeds.shape[0] == 0:
        raise ValueError(f"{where} holds zero documents")
    if not embeds.is_floating_point():
        raise TypeError(f"{where} has dtype {embeds.dtype}; expected a floating-point tensor from `compress`")
    if not torch.isfinite(embeds).all():
        raise ValueError(f"{where} contains NaN or inf")


def check_positive(name: str, value) -> None:
    """An error naming `name` unless `value` is an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


__all__ = [
    "ClaraProcessor",
    "PromptTooLongError",
    "add_clara_special_tokens",
    "check_positive",
    "check_questions_and_embeds",
    "check_texts",
    "load_tokenizer",
    "save_tokenizer",
]
