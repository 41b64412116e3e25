"""Raw datasets to Parquet shards and back to worker batches: sources, prepare, format, dataset, validation split, feeds, memory check."""
