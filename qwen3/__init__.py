"""qwen3 package."""
