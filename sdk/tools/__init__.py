"""Tooling around the runtime: the benchmark and the peers it compares against (:mod:`.bench`,
:mod:`.peers`), the memory planner (:mod:`.memory`) and cost projection (:mod:`.cost`). The
runtime never imports these.
"""
