"""fastmoco's bench suite: `python bench/throughput.py` (see bench/RESULTS.md)."""
