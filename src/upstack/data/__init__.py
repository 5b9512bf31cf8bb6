"""Datasets and benchmark files. See docs/data.md.

Training data: spec.py (naming a source), filters.py, files.py (one file's records), sources.py (files
or hub dataset of a spec), mixing.py, load_report.py, loading.py (load_sft_rows, load_dpo_rows,
iter_text_documents); formats.py (row formats -> normalised SFT/DPO rows); chat.py (rendering and
encoding for SFT/DPO); jsonl.py (the one JSON rows reader). Benchmarks: benchmarks.py (their file
formats), ngrams.py (words and n-gram overlap), decontaminate.py. Generated data: synthetic.py and
word_problems.py (the demo's task world), synth_math.py (Synth. Math-Instruct/Alignment), tokenizer.py.
"""
