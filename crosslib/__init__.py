"""crosslib: crosscoders across pre-training snapshots.

Modules (imported on demand, so `import crosslib` stays fast), in data-flow order:
  constants    Pythia's checkpoint schedule, the data directory
  config       typed configs with declared field checks, and ParameterError
  artifacts    content-addressed, atomically published, resumable artifacts
  machine      what this CPU can do (native bf16), recorded with each suite
  runtime      process-wide settings, made by entry points only
  fetch        the pinned downloads (corpora, MathJax)
  corpus       text corpora and their train/held-out split
  tokenizer    byte-level BPE trained on a corpus
  suite        tiny Pythia-architecture snapshot suites, trained on Pythia's schedule
  snapshots    loading a snapshot from a local suite or a hub repo (one code path)
  dynamics     learning-dynamics metrics per snapshot (n-gram fits, induction)
  hooks        hook names (blocks.{L}.hook_resid_post, ...), capture and replacement
  cache        writing the activation cache aligned across snapshots
  store        reading it: ActivationStore
  sources      the row sources the trainers read (the store's base, an in-memory source)
  reference    the crosscoder's math on one screen: the oracle for the fast path
  crosscoder   the crosscoder (an SAE is a crosscoder over one snapshot)
  kernels      its fused, sparse and compiled kernels behind one KernelOptions switch
  train        crosscoder and SAE training: build, resume-or-init, loop, finalise
  distributed  the sharding protocol; head- and data-parallel training under torchrun
  saelens      export per-snapshot SAEs to sae-lens's on-disk format
  emergence    when features form: trajectories, firing, emergence, turning point
  probes       linear-separability probes: is a bigger decoder norm a more readable feature?
  saetrack     SAE-Track: the warm-started chain of per-snapshot SAEs and its cold baselines
  saetrack_analysis  what the chain shows: formation, drift, paths, the two lenses compared
  dashboards   feature dashboards (static HTML)
  complexity   feature complexity scoring (offline context depth, LLM rubric)
  crosslayer   features of adjacent layers: crosslayer_statistics, _findings, _page
  tasks        behavioural tasks (induction, agreement, IOI) with single-token targets
  attribution  splicing a dictionary into a model, attribution, ablation and patching
  explorer     the browsable feature explorer's data and page
  statistics   the correlation and trend tests the verdicts use
  claims       the "Does it reproduce?" verdicts, one function per claim
  pipeline     the chain chapters walk: suite → activation store → dictionary
  parameters   one check per chapter parameter, run before any expensive work
  book_defaults  the parameter defaults chapters 2-6 share
  book, progress, verify, cli  the papermill runner, its progress lines, `crosslib verify`, the command
"""

__version__ = "0.1.0"
