"""Survey data: catalogues, resampling, the store, splits, ingest and fetch."""
