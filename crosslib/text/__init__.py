"""Text: the corpora the tiny suites train on, and their tokenizer.

  corpus       text corpora (fetched or local) and their train/held-out split
  tokenizer    byte-level BPE trained on a corpus, saved in Hugging Face format
"""
