"""The data engine: crawl, filter and shard stages (each a CLI and a Ray job), the sample web and the demo."""
