"""Model sources: the catalog, where a model's files are (local, the embedded default, the Hub), and GGUF."""
