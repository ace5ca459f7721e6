"""Serving CLaRa over HTTP: `clara serve` (see `modeling_clara/cli/serve.py`).

- `batching.py`: `DynamicBatcher`, which groups concurrent requests into one model call, bounded and cancellable.
- `engine.py`: `ClaraServingEngine`, the batch functions (compress, search, answer) on the model's public methods.
- `vllm_generator.py`: generation through vLLM from prompt embeddings, the decoder adapter as a vLLM LoRA.
- `app.py`: the FastAPI application: endpoints, request validation, errors and Prometheus metrics.

Only `app.py` needs the `serve` extra (fastapi, uvicorn, prometheus-client), and only `vllm_generator.py` vLLM.
"""
