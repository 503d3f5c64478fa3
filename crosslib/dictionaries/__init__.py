"""Dictionaries: crosscoders and SAEs (an SAE is a crosscoder over one snapshot), and training them.

  reference    the crosscoder's math on one screen: the oracle the fast path is tested against
  crosscoder   the model: encode, JumpReLU gate, decode, the paper's loss
  kernels      its fused, sparse and compiled kernels behind one `KernelOptions` switch
  train        training: build, resume-or-init, loop, finalise; cached by content
  distributed  the sharding protocol; head- and data-parallel training under torchrun
  saetrack     SAE-Track: the warm-started chain of per-snapshot SAEs and its cold baselines
  saelens      per-snapshot SAEs to and from sae-lens's on-disk format
"""
