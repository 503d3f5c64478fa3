"""Models: the pre-training snapshots a crosscoder reads, and how to look inside them.

  suite          tiny Pythia-architecture snapshot suites, trained on Pythia's schedule
  cross_entropy  the suite's training loss: a one-line reference and a chunked fast path
  snapshots      loading a snapshot from a local suite or a hub repo (one code path)
  hooks          hook names (blocks.{L}.hook_resid_post, ...), capture and replacement
"""
