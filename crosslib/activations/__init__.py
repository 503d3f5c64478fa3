"""Activations: the same token positions read out of every snapshot, on disk and in memory.

  cache        writing the activation cache, aligned row by row across snapshots
  store        reading it: `open_store` and `ActivationStore`
  sources      the `ActivationSource` protocol the trainers read, its `RowSource` base, in-memory rows
"""
