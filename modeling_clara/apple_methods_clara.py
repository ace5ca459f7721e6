"""Apple's method names and signatures on `ClaraForRAG`, so apple/ml-clara's README examples run unchanged.

A mixin of `ClaraForRAG`: each method checks its arguments as Apple's API takes them and calls the model's own
compression, selection and generation. It imports only torch and sibling files, never the model file.
"""

import time

import torch

from .processing_clara import check_texts


class ClaraAppleMethodsMixin:
    """`compress_documents`, `generate_from_text`, `generate_from_paraphrase`,
    `generate_from_compressed_documents_and_questions` and `generate_from_questions`, as in ml-clara."""

    def compress_documents(self, documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Apple's `compress_documents`: `(embeddings (n_docs, n_mem, hidden), mse_loss)`."""
        documents = check_texts(documents, "documents")
        inputs, n_truncated = self._encoder_inputs(documents)
        self.processor.report_truncation(n_truncated, len(documents), "documents")
        return self._encode_documents(inputs["input_ids"], inputs["attention_mask"])

    @torch.no_grad()
    def generate_from_text(
        self, questions: list[str], documents: list[list[str]], max_new_tokens: int = 128
    ) -> list[str]:
        """Apple's `generate_from_text`: compress each question's documents and answer from all of them."""
        questions, documents = _check_questions_and_documents(questions, documents)
        selected = self._compress_per_question(documents)
        return self._generate_from_embeds(questions, selected, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def generate_from_paraphrase(
        self, questions: list[str], documents: list[list[str]], max_new_tokens: int = 128
    ) -> list[str]:
        """Apple's `generate_from_paraphrase`: reconstruct the documents (stage-1 paraphrase prompt; the
        instruction is drawn with `random.choice`, as Apple does; `questions` only sets the batch size)."""
        questions, documents = _check_questions_and_documents(questions, documents, allow_empty_questions=True)
        selected = self._compress_per_question(documents)
        return self._generate_from_embeds(questions, selected, task="paraphrase", max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def generate_from_compressed_documents_and_questions(
        self, questions: list[str], compressed_documents: torch.Tensor, max_new_tokens: int = 128
    ) -> list[str]:
        """Apple's method: `compressed_documents` is `(n_questions * docs_per_question, n_mem, hidden)`."""
        questions = check_texts(questions, "questions")
        if compressed_documents.shape[0] % len(questions):
            raise ValueError(
                f"{compressed_documents.shape[0]} compressed documents do not split evenly over "
                f"{len(questions)} questions"
            )
        per_question = list(compressed_documents.view(len(questions), -1, *compressed_documents.shape[1:]))
        _, selected = self._check_questions_and_embeds(questions, per_question)
        return self._generate_from_embeds(questions, selected, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def generate_from_questions(
        self,
        questions: list[str],
        max_new_tokens: int = 128,
        temperature: float = 0.5,
        documents: list[list[str]] | None = None,
        stage2_mips: bool = False,
        stage2_retrieval_top_n: int | None = None,
        time_count: bool = False,
    ):
        """Apple's end-to-end method: the query reasoner picks `generation_top_k` of each question's documents.

        Returns `(answers, topk_indices)`; with `time_count=True` also compression, query and generation seconds
        and their total, as Apple's does. `temperature` is unused here as in Apple's code (the top-k uses 0.02).
        """
        if stage2_mips:
            raise NotImplementedError(
                "stage2_mips retrieves from Apple's external HTTP service; use `ClaraIndex` to retrieve from a corpus"
            )
        if documents is None:
            raise ValueError("`documents` is required: the candidate documents of each question")
        self.eval()
        questions, documents = _check_questions_and_documents(questions, documents)
        start = time.perf_counter()
        query_reps = self.encode_queries(questions)
        compress_start = time.perf_counter()
        candidates = torch.stack(self._compress_per_question(documents))
        query_start = time.perf_counter()
        _, _, topk_indices = self._select_top_k(query_reps, candidates)
        selected = [c[idx] for c, idx in zip(candidates, topk_indices)]
        generate_start = time.perf_counter()
        answers = self._generate_from_embeds(questions, selected, max_new_tokens=max_new_tokens)
        end = time.perf_counter()
        if not time_count:
            return answers, topk_indices
        compress_time = query_start - compress_start
        query_time = (compress_start - start) + (generate_start - query_start)
        generate_time = end - generate_start
        return answers, topk_indices, compress_time, query_time, generate_time, compress_time + query_time + generate_time

    def _compress_per_question(self, documents: list[list[str]]) -> list[torch.Tensor]:
        flat = [doc for docs in documents for doc in docs]
        inputs, n_truncated = self._encoder_inputs(flat)
        self.processor.report_truncation(n_truncated, len(flat), "documents")
        embeds = self._encode_documents(inputs["input_ids"], inputs["attention_mask"])[0]
        return list(embeds.split([len(docs) for docs in documents]))


def _check_questions_and_documents(questions, documents, allow_empty_questions: bool = False):
    if not isinstance(questions, (list, tuple)) or not questions:
        raise TypeError(f"`questions` must be a non-empty list of str, got {questions!r:.80}")
    if not allow_empty_questions:
        questions = check_texts(questions, "questions")
    if not isinstance(documents, (list, tuple)) or len(documents) != len(questions):
        raise ValueError(
            f"`documents` must be a list with one list of documents per question ({len(questions)}), got {documents!r:.80}"
        )
    documents = [check_texts(docs, f"documents[{i}]") for i, docs in enumerate(documents)]
    if len({len(docs) for docs in documents}) > 1:
        raise ValueError(
            f"every question needs the same number of documents here (Apple's API); got {[len(d) for d in documents]}. "
            "`answer` accepts different numbers."
        )
    return list(questions), documents


__all__ = ["ClaraAppleMethodsMixin"]
