"""crosslib: crosscoders across pre-training snapshots.

Modules (imported on demand, so `import crosslib` stays fast), in data-flow order:
  constants   Pythia's checkpoint schedule, the data directory
  config      typed configs and ParameterError (one clear error per bad parameter)
  artifacts   content-addressed, atomically published, resumable artifacts
  corpus      text corpora and their train/held-out split
  tokenizer   byte-level BPE trained on a corpus
  suite       tiny Pythia-architecture snapshot suites, trained on Pythia's schedule
  snapshots   loading a snapshot from a local suite or a hub repo (one code path)
  dynamics    learning-dynamics metrics per snapshot (n-gram fits, induction)
  hooks       hook names (blocks.{L}.hook_resid_post, ...), capture and replacement
  cache       activation cache aligned across snapshots
  sources     the activation-source protocol the trainers read (and an in-memory source)
  crosscoder  the crosscoder (an SAE is a crosscoder over one snapshot)
  train       crosscoder and SAE training
  distributed head-parallel (snapshot-sharded) and data-parallel training under torchrun
  saelens     export per-snapshot SAEs to sae-lens's on-disk format
  emergence   when features form: trajectories, emergence, turning point
  probes      linear-separability probes: is a bigger decoder norm a more readable feature?
  dashboards  feature dashboards (static HTML)
  complexity  feature complexity scoring (offline context depth, LLM rubric)
  crosslayer  statistics between features of adjacent layers, gates, graph
  tasks       behavioural tasks (induction, agreement, IOI) with single-token targets
  attribution splicing a dictionary into a model, attribution, ablation and patching
  pipeline    the chain chapters walk: suite → activation store → dictionary
  book        the papermill runner that builds the book
"""

__version__ = "0.1.0"
