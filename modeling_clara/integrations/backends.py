"""What the LangChain and LlamaIndex integrations ask of CLaRa, answered in this process (`LocalClara`: a model and
an index) or by a `clara serve` server (`RemoteClara`: its `/v1/search` and OpenAI-compatible
`/v1/chat/completions`).

Both return the same things: `ReadDocument`s (what a search found or an answer read) and a `ClaraAnswer` (the text,
the documents read, the generator's prompt and completion tokens, and why generation stopped). `stream` yields the
text as it is generated, then the `ClaraAnswer`.
"""

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import requests
import torch
from transformers import TextIteratorStreamer

DEFAULT_TIMEOUT_S = 120.0


@dataclass
class ReadDocument:
    """A document a search found or an answer read: its id (the index's, or the position among given documents),
    CLaRa's cosine score (`None` for given documents read in order) and its text."""

    id: str
    score: float | None
    text: str


@dataclass
class ClaraAnswer:
    text: str
    documents: list[ReadDocument]
    prompt_tokens: int  # the generator's prompt, memory slots included
    completion_tokens: int
    finish_reason: str  # "stop" (end of answer or a stop string) or "length" (max_new_tokens reached)
    model: str = ""


@dataclass
class GenerationOptions:
    """OpenAI's sampling options as CLaRa takes them: `temperature` 0 is greedy."""

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = {}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        if self.stop:
            kwargs.update(stop_strings=list(self.stop), tokenizer=tokenizer)
        return kwargs


class VisibleText:
    """The part of a growing answer that can be shown: leading whitespace dropped (as `model.answer` strips it),
    cut before the first stop string; while more may come, trailing whitespace and a tail that could begin a stop
    string are held back, so the pieces shown join to the final text."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.raw, self.shown, self.stopped = "", 0, False

    def add(self, piece: str, final: bool = False) -> str:
        """The new visible text after `piece` (`final`: nothing follows)."""
        if self.stopped:
            return ""
        self.raw += piece
        text = self.raw.lstrip()
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        if final or self.stopped:
            text = text.rstrip()
        else:
            text = text.rstrip()
            held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            # what precedes a held tail may end in whitespace, which the cut text would not show
            text = text[: len(text) - held].rstrip()
        new = text[self.shown :]
        self.shown = max(self.shown, len(text))
        return new

    @property
    def text(self) -> str:
        return self.raw.lstrip()[: self.shown]


class CountingStreamer(TextIteratorStreamer):
    """`TextIteratorStreamer` that hands on the text of every token (not only whole words: a chat client shows each
    token as it comes), holding back only an incomplete character; it counts the tokens generated and keeps the
    last one (for `finish_reason`)."""

    def __init__(self, tokenizer, timeout: float | None = None):
        super().__init__(tokenizer, skip_prompt=True, timeout=timeout, skip_special_tokens=True)
        self.n_tokens, self.last_token = 0, None

    def put(self, value: torch.Tensor):
        if self.next_tokens_are_prompt:  # generate's first call: the prompt (empty when it is given as embeddings)
            self.next_tokens_are_prompt = False
            return
        tokens = value.reshape(-1).tolist()
        self.n_tokens += len(tokens)
        self.last_token = tokens[-1]
        self.token_cache.extend(tokens)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if not text.endswith("\ufffd"):  # a multi-byte character split across tokens
            self.on_finalized_text(text[self.print_len :])
            self.print_len = len(text)


def finish_reason(streamer: CountingStreamer, max_new_tokens: int, stopped: bool) -> str:
    """"length" when the answer ran into `max_new_tokens` (its last token is not an end token), else "stop"."""
    ended = streamer.last_token in streamer.tokenizer.all_special_ids
    return "length" if streamer.n_tokens >= max_new_tokens and not (stopped or ended) else "stop"


class LocalClara:
    """A `ClaraForRAG` in this process, answering from a `ClaraIndex` (or from documents given per call), through
    the model's public methods."""

    def __init__(self, model, index=None, k: int | None = None, model_name: str | None = None):
        self.model, self.index = model, index
        self.k = k or model.config.generation_top_k
        self.model_name = model_name or str(getattr(model, "name_or_path", "") or "clara")

    def search(self, question: str, k: int | None = None) -> list[ReadDocument]:
        if self.index is None:
            raise ValueError("searching needs an index: pass `index=` (a ClaraIndex)")
        result = self.index.search(question, k=k or self.k)
        return [ReadDocument(i, s, t) for i, s, t in zip(result.ids, result.scores, result.texts)]

    def prompt_tokens(self, question: str, n_docs: int) -> int:
        """The generator's prompt length for `question` reading `n_docs` documents, memory slots included."""
        processor = self.model.processor
        return len(processor.prompt_ids([processor.build_prompt(n_docs, task="answer", question=question)[0]])[0])

    def stream(self, question: str, options: GenerationOptions, documents: list[str] | None = None,
               k: int | None = None, cancel: threading.Event | None = None) -> Iterator[str | ClaraAnswer]:
        """The answer's text as it is generated, then the `ClaraAnswer`. With `documents`, they are compressed and
        read as `model.answer` reads them; otherwise the top `k` of the index."""
        model, k = self.model, k or self.k
        if documents is None and self.index is None:
            raise ValueError("answering needs an index (`index=`) or `documents`")
        max_new_tokens = options.max_new_tokens or model.config.max_new_tokens
        streamer = CountingStreamer(model.tokenizer, timeout=DEFAULT_TIMEOUT_S)
        cancel = cancel or threading.Event()
        # A consumer that stops reading sets `cancel`: generation ends at its next token.
        kwargs = dict(k=k, return_dict=True, max_new_tokens=max_new_tokens, streamer=streamer,
                      should_stop=cancel.is_set, **options.generate_kwargs(model.tokenizer))
        if documents is None:
            kwargs["index"] = self.index
        else:
            kwargs["doc_embeds"] = model.compress(list(documents))
        outcome = {}

        def generate():
            try:
                if options.seed is not None:
                    torch.manual_seed(options.seed)
                outcome["result"] = model.answer(question, **kwargs)
            except Exception as error:  # raised to the caller below
                outcome["error"] = error
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        visible = VisibleText(options.stop)
        try:
            for piece in streamer:
                if new := visible.add(piece):
                    yield new
        finally:  # a consumer that stops reading ends the generation at its next token
            cancel.set()
            thread.join()
        if "error" in outcome:
            raise outcome["error"]
        if new := visible.add("", final=True):
            yield new
        result = outcome["result"]
        ids, scores = [str(i) for i in result["doc_indices"]], result["scores"]
        if documents is None:
            texts = self.index.texts(ids)
        else:
            texts = [documents[int(i)] for i in ids]
        scores = scores or [None] * len(ids)
        yield ClaraAnswer(
            text=visible.text, documents=[ReadDocument(i, s, t) for i, s, t in zip(ids, scores, texts)],
            prompt_tokens=self.prompt_tokens(question, len(ids)), completion_tokens=streamer.n_tokens,
            finish_reason=finish_reason(streamer, max_new_tokens, visible.stopped),
            model=self.model_name,
        )

    def answer(self, question: str, options: GenerationOptions, documents: list[str] | None = None,
               k: int | None = None) -> ClaraAnswer:
        *_, answer = self.stream(question, options, documents, k)
        return answer


class RemoteClara:
    """A `clara serve` server: `/v1/search` and its OpenAI-compatible `/v1/chat/completions`."""

    def __init__(self, base_url: str, api_key: str | None = None, k: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = 2, model_name: str | None = None):
        self.base_url, self.k, self.timeout, self.model_name = base_url.rstrip("/"), k, timeout, model_name
        self.session = requests.Session()
        self.session.mount(self.base_url, requests.adapters.HTTPAdapter(max_retries=max_retries))
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _post(self, path: str, body: dict, stream: bool = False) -> requests.Response:
        response = self.session.post(f"{self.base_url}{path}", json=body, timeout=self.timeout, stream=stream)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise ValueError(f"{path} answered {response.status_code}: {message}")
        return response

    def search(self, question: str, k: int | None = None) -> list[ReadDocument]:
        body = {"question": question}
        if k or self.k:
            body["k"] = k or self.k
        hits = self._post("/v1/search", body).json()["documents"]
        return [ReadDocument(h["id"], h["score"], h["text"]) for h in hits]

    def _chat_body(self, question: str, options: GenerationOptions, documents, k, stream: bool) -> dict:
        body = {"model": self.model_name or "clara", "messages": [{"role": "user", "content": question}],
                "temperature": options.temperature, "stream": stream}
        optional = {"max_tokens": options.max_new_tokens, "top_p": options.top_p, "seed": options.seed,
                    "stop": options.stop or None, "documents": documents, "k": k or self.k}
        body.update({name: value for name, value in optional.items() if value is not None})
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    @staticmethod
    def _documents(entries: list[dict]) -> list[ReadDocument]:
        return [ReadDocument(d["id"], d["score"], d["text"]) for d in entries]

    def answer(self, question: str, options: GenerationOptions, documents: list[str] | None = None,
               k: int | None = None) -> ClaraAnswer:
        completion = self._post("/v1/chat/completions", self._chat_body(question, options, documents, k, False)).json()
        choice, usage = completion["choices"][0], completion["usage"]
        return ClaraAnswer(choice["message"]["content"], self._documents(completion["documents"]),
                           usage["prompt_tokens"], usage["completion_tokens"], choice["finish_reason"],
                           completion["model"])

    def stream(self, question: str, options: GenerationOptions, documents: list[str] | None = None,
               k: int | None = None, cancel: threading.Event | None = None) -> Iterator[str | ClaraAnswer]:
        body = self._chat_body(question, options, documents, k, True)
        text, read, usage, reason, model = [], [], None, "stop", ""
        with self._post("/v1/chat/completions", body, stream=True) as response:
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line.removeprefix("data: "))
                model = chunk.get("model", model)
                if "documents" in chunk:
                    read = self._documents(chunk["documents"])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    reason = choice.get("finish_reason") or reason
                    if piece := choice.get("delta", {}).get("content"):
                        text.append(piece)
                        yield piece
        usage = usage or {"prompt_tokens": 0, "completion_tokens": 0}
        yield ClaraAnswer("".join(text), read, usage["prompt_tokens"], usage["completion_tokens"], reason, model)
