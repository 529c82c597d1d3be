"""The grain input pipeline: sources -> documents -> tokens -> packed rows -> per-host batches.

sources.py     text files, JSONL and ArrayRecord as random-access record sources
tokenizers.py  sentencepiece and Hugging Face tokenizer.json behind one small interface
pipeline.py    shard, shuffle, tokenize (skipping bad records), pack, batch; the iterator
               whose state is saved with every checkpoint
stdlib.py      the embedded default corpus: the Python standard library's own sources
"""
