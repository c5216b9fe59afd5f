"""SQL models, repositories and the Redis caches."""
