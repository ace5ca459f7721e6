"""The settings of `clara serve`, importable without the serve extra (the command line reads its defaults here)."""

from dataclasses import dataclass, field

API_KEY_ENV = "CLARA_API_KEY"
MAX_DOCUMENTS = 64  # documents one request may send on any server; --max-documents may lower it
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeSettings:
    """How `clara serve` batches, bounds and guards requests; each field is the `clara serve` option of its name
    (without `_s`, seconds).

    The defaults keep one request's model time to seconds on one CPU core with the shipped 135M model (measured in
    docs/serving.md): a compress call holds the model for `max_batch_documents` documents, a request compresses
    `max_documents` at most, an answer generates `max_new_tokens` at most.
    """

    model_name: str
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    request_timeout_s: float = 60.0
    max_body_bytes: int = 1 << 20
    max_documents: int = 8
    max_batch_documents: int = 2
    max_new_tokens: int = 128
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0
    limit_concurrency: int = 64
    max_header_bytes: int = 16 * 1024
    shutdown_timeout_s: float = 10.0
    allowed_hosts: list[str] = field(default_factory=lambda: ["*"])
    api_key: str | None = None
    forwarded_allow_ips: str | None = None

    def __post_init__(self):
        if not 1 <= self.max_documents <= MAX_DOCUMENTS:
            raise ValueError(f"max_documents={self.max_documents} must be in [1, {MAX_DOCUMENTS}]")
        positive = ("max_batch_documents", "max_new_tokens", "request_timeout_s", "header_timeout_s",
                    "body_timeout_s", "keep_alive_timeout_s", "limit_concurrency", "max_header_bytes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for host in self.allowed_hosts:  # the patterns Starlette's TrustedHostMiddleware takes
            if "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*.")):
                raise ValueError(f"allowed host {host!r}: a wildcard must be '*' or lead a domain, '*.example.com'")


def default_allowed_hosts(bind_host: str) -> list[str]:
    """The Host names a server bound to `bind_host` answers: the loopback names on loopback, else any."""
    return [*LOOPBACK_HOSTS, "[::1]"] if bind_host in LOOPBACK_HOSTS else ["*"]
