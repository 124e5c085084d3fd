"""The report folder a reviewer reads: `summary.json` (schema `parity.report/1`, the RunReport and what the plots
need), rendered into `report.md`, a self-contained `report.html` (plots inline as SVG), `metrics.csv`, and an
executable `repro.sh` that reruns the case. `folder.py` writes and re-renders a folder; `rowmap.py` extracts the
per-(request, position) errors of one site (what the heatmap shows) while the run's dumps are in memory.

The package renders plain dicts and imports no job: it sits between `compare` and the jobs that call it
(`run.py`, `gate.py`, the commands). The plotting library loads only when a folder is rendered.
"""
