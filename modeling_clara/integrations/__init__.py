"""CLaRa in other libraries' terms: LangChain (`integrations.langchain`, extra `langchain`) and LlamaIndex
(`integrations.llama_index`, extra `llama-index`). Import the submodule of the library you use."""
