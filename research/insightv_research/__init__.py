"""Research on insightv-agents, beside the library and built on it (the library never imports
this package).

- :mod:`insightv_research.shapes`: the shapes world, a procedural visual-reasoning benchmark
  whose every part can be made, trained and measured offline.
- :mod:`insightv_research.reproduce`: Insight-V's comparison at small scale on the shapes world,
  from nothing (``make reproduce``); its results and history are in ``research/docs``.
"""
