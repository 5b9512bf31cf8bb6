"""Datasets: row formats and their adapters (formats.py), reading and mixing sources (loading.py),
the demo's synthetic task suite (synthetic.py). See docs/data.md."""
