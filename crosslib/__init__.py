"""crosslib: crosscoders across pre-training snapshots.

The packages follow the data, from text to the book (modules are imported on demand, so
`import crosslib` stays fast):

  text/          corpora and their tokenizer
  models/        snapshot suites, loading snapshots, hooks into them
  activations/   the activation cache (writer, reader) and the row sources trainers read
  dictionaries/  the crosscoder (reference math, fast kernels), training, SAE-Track, sae-lens export
  analyses/      dynamics, emergence, probes, complexity, circuits, cross-layer, dashboards, explorer
  book/          the chain chapters walk, parameter checks, shared defaults, verdicts, the runner

Beside them, what every stage uses:

  constants    Pythia's checkpoint schedule, the data directory
  config       typed configs with declared field checks, and ParameterError
  artifacts    content-addressed, atomically published, resumable artifacts
  statistics   the correlation and trend tests the analyses and verdicts use
  progress     progress bars and plain progress lines for logs
  machine      what this CPU can do (native bf16), recorded with each suite
  runtime      process-wide settings, made by entry points only
  fetch, verify, cli  the pinned downloads, `crosslib verify`, the command
"""

__version__ = "0.1.0"
