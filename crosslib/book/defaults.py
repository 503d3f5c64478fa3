"""The parameter defaults that chapters 2–6 share, in one place.

Chapter 2 trains a crosscoder for each λ of its sweep; chapters 3–6 read the one at
`sparsity_coefficient`. Because they ask for it with the same suite, tokens, dictionary size, λ,
training steps, batch and seed, they get the same cache key and load it instead of training it
again (`crosslib.dictionaries.train.train_crosscoder_cached`). Each chapter's `parameters` cell reads these values:

    from crosslib.book import defaults as shared
    dict_size = shared.dict_size  # features per dictionary

So a value changed here changes for every chapter at once (and, as this file is part of the
`crosslib` package, `crosslib book` re-runs them). To try another value in one chapter only,
write it in that chapter's `parameters` cell, or run `crosslib book -p name=value`.

Each name here is the chapter parameter of the same name; the chapters' `parameters` cells say
what each one means. `crosslib book --list` shows every chapter's defaults with these values.
"""

# The model and the text it reads.
suite = "tiny"
suite_overrides = {}
hook = "blocks.2.hook_resid_post"
steps = None  # every snapshot of the suite
n_tokens = 200_000
corpus = None  # the suite's own
split = "heldout"

# The crosscoder: chapter 2 trains it at each λ of its sweep, chapters 3-6 reuse the one at
# `sparsity_coefficient` (so the sweep must hold it).
dict_size = 512
sparsity_coefficient = 0.3
sparsity_coefficients = [0.03, 0.1, 0.3, 1.0, 3.0]
n_steps = 600
batch_size = 1024

# When a feature exists, is strong and has faded (chapters 3-5).
min_firing_rows = 5
strong_fraction = 0.5
fade_fraction = 0.25

# The learning-dynamics curves chapter 3 draws (with chapter 1's values).
n_windows = 200
induction_sequences = 100
dynamics_batch_size = 50

device = "cpu"
seed = 0
