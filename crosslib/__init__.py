"""crosslib: crosscoders across pre-training snapshots.

Modules (imported on demand, so `import crosslib` stays fast):
  constants  Pythia's checkpoint schedule, data directory
  config     typed configs, ParameterError
  artifacts  content-addressed, atomically published artifacts
  corpus     text corpora and their train/held-out split
  suite      tiny Pythia-architecture snapshot suites; loading local or hub snapshots
  dynamics   learning-dynamics metrics per snapshot
  hooks      hook names (blocks.{L}.hook_resid_post, ...) and activation capture
  cache      activation cache aligned across snapshots
  crosscoder the crosscoder (an SAE is a crosscoder with one snapshot)
  train      crosscoder/SAE training
  book       papermill runner and book build
"""

__version__ = "0.1.0"
