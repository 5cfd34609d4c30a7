"""Face analysis: finding an insightface pack, loading its models, and one aligned,
embedded face per photo."""
