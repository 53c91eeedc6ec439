"""The sweep report: ``report.md``, ``claims.json`` and ``figures/`` (SPEC §6–7).

* :mod:`paper` — the published numbers, keyed by ``config.paper``;
* :mod:`claims` — the seven claims and their computed verdicts;
* :mod:`figures` — analogues of the paper's Fig. 1, 3, 4, 5, 6, 8;
* :mod:`tables` — markdown tables in the paper's layouts;
* :mod:`builder` — assembles the report from the runs' analysis files.
"""
