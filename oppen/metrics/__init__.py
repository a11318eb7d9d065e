"""Prometheus metrics: the catalog of names (catalog.py) and the two places they are served from.

- run_exporter.py: a training run serves its own `oppen_training_*` / `oppen_run_*` series while it runs
  (training_metrics.py, resource_sampler.py with process_tree.py and gpu.py, run_cost.py), found through
  file_sd locally (file_sd.py) and a PodMonitor on Kubernetes.
- platform_exporter.py: one process serves queues, workers, budgets and outcomes from polls of Prefect's
  API and the ledger (platform_collector.py, platform_readings.py).
"""
