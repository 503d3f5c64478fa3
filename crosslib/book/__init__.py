"""The book: what the chapter notebooks call around the science, and the runner that builds them.

  pipeline     the chain chapters walk: suite → activation store → dictionary, each step cached
  parameters   one check per chapter parameter, run before any expensive work
  defaults     the parameter defaults chapters 2-6 share
  claims       the "Does it reproduce?" verdicts, one function per claim of the papers
  runner       `crosslib book`: papermill runs of the chapters, their progress, the HTML build
"""
