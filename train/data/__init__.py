"""The grain input pipeline: sources -> documents -> tokens -> packed rows -> per-host batches.

sources.py     text files, JSONL, ArrayRecord and Parquet as random-access record sources
parquet.py     Parquet: the text column, row group by row group (pyarrow)
split.py       the held-out split by a hash of each document's bytes
mixture.py     data.mixture: several sources mixed by weight (grain), tokens per source
tokenizers.py  sentencepiece and Hugging Face tokenizer.json behind one small interface
input.py       input_pipeline(): decides text vs multimodal once, builds this process's
               iterator and assembles global batches
iterator.py    fixed virtual shards -> this process's rows; the iterator whose state is saved
               with every checkpoint and restores on another process count
pipeline.py    one shard: shuffle, tokenize (skipping bad records), pack, batch
stdlib.py      the embedded default corpus: the Python standard library's own sources
multimodal.py  image-text documents -> tokens with expanded placeholders, a text-only loss
               mask, patches; first-fit packing into rows with a fixed patch budget
digits.py      real images shipped in scikit-learn (the `digits` extra), captioned "digit 7"
"""
