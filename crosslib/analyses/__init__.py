"""Analyses: what the snapshots and their dictionaries show. Each takes models, stores or
dictionaries and returns plain numbers and tables; none trains a dictionary itself.

  dynamics     learning-dynamics metrics per snapshot (n-gram fits, induction)
  emergence    when features form: trajectories, firing, emergence, turning point
  probes       is a bigger decoder norm a more linearly readable feature?
  complexity   feature complexity scoring (offline context depth, LLM rubric)
  tasks        behavioural tasks (induction, agreement, IOI) with single-token targets
  attribution  splicing a dictionary into a model: attribution, ablation and patching
  crosslayer   features of adjacent layers, the three modules below in one namespace
  crosslayer_statistics  streaming statistics between adjacent layers' SAE features
  crosslayer_findings    what they show: the feature graph, its communities, the findings
  crosslayer_page        the interactive graph page (templates/crosslayer_graph.html)
  saetrack_analysis  what an SAE-Track chain shows: formation, drift, paths
  dashboards   feature dashboards (static HTML)
  explorer     the browsable feature explorer's data and page (templates/)
"""
