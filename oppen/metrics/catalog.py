"""Every Prometheus metric Oppen exposes: one name, one help text, one label set each.

Two exporters serve them (see README, "Monitoring"):

- **Run metrics** are served by the flow-run process itself while it trains (`oppen_run_*`,
  `oppen_training_*`), on `OPPEN_METRICS_PORT` (0: a free port). They carry the flow-run id, and
  they exist exactly as long as the run: when the process ends its target goes away, so their
  cardinality is bounded by the runs in flight. Kubernetes scrapes the training pods through a
  PodMonitor; locally each run writes a file_sd target under `$OPPEN_HOME/metrics-targets/`.
- **Platform metrics** are served by one `oppen exporter` next to Prefect's server (`oppen_queue_*`,
  `oppen_budget_*`, `oppen_flow_runs_*`). They are labelled by pool, queue, team, experiment and
  deployment only: bounded by configuration, never by run ids.

The alert rules, dashboards and tests read names from here, so a renamed metric breaks a test,
not a dashboard in production.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RUN_LABELS = ("flow_run_id", "workload", "experiment", "team")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...]


RUN_METRICS = [
    # training
    MetricSpec("oppen_training_loss", "gauge",
               "Training loss, smoothed over the latest steps (exponential moving average, span 20 steps).",
               RUN_LABELS),
    MetricSpec("oppen_training_validation_metric", "gauge",
               "Latest validation result, one series per figure the workload reports at an epoch end (metric: "
               "val_accuracy and val_loss for mnist, val_perplexity and val_loss for lm).", RUN_LABELS + ("metric",)),
    MetricSpec("oppen_training_samples_per_second", "gauge",
               "Throughput over the latest steps of the epoch in progress (up to 32), wall time between steps.",
               RUN_LABELS),
    MetricSpec("oppen_training_epoch", "gauge", "Epoch in progress (1-based).", RUN_LABELS),
    MetricSpec("oppen_training_step", "gauge", "Optimizer steps done.", RUN_LABELS),
    MetricSpec("oppen_training_total_steps", "gauge", "Optimizer steps planned.", RUN_LABELS),
    MetricSpec("oppen_training_epoch_seconds", "gauge", "Wall seconds of the epoch in progress so far, or of the last one.",
               RUN_LABELS),
    MetricSpec("oppen_training_expected_epoch_seconds", "gauge",
               "Seconds an epoch should take by this request's speed history (absent without history).", RUN_LABELS),
    # resources
    MetricSpec("oppen_run_cpu_percent", "gauge", "CPU use of the run's process tree (100 = one core).", RUN_LABELS),
    MetricSpec("oppen_run_cpu_cores_requested", "gauge", "CPU cores the run is billed for.", RUN_LABELS),
    MetricSpec("oppen_run_gpu_utilization_percent", "gauge",
               "Mean utilisation of the run's GPUs (NVML; absent without GPUs or NVML).", RUN_LABELS),
    MetricSpec("oppen_run_gpu_memory_bytes", "gauge",
               "GPU memory in use on the run's GPUs, summed (NVML; absent without GPUs or NVML).", RUN_LABELS),
    MetricSpec("oppen_run_gpus", "gauge", "GPUs the run holds.", RUN_LABELS),
    MetricSpec("oppen_run_memory_bytes", "gauge", "Resident memory of the run's process tree.", RUN_LABELS),
    MetricSpec("oppen_run_memory_limit_bytes", "gauge",
               "Memory the run may use: its request (memory_gib), else its container's limit, else the machine's.",
               RUN_LABELS),
    # cost
    MetricSpec("oppen_run_cost_accrued_usd", "gauge",
               "What the run has cost so far (all attempts), as of the meter's latest step.", RUN_LABELS),
    MetricSpec("oppen_run_cost_forecast_usd", "gauge", "Forecast total cost of the run.", RUN_LABELS),
    MetricSpec("oppen_run_cost_cap_usd", "gauge", "The run's cap (absent without one).", RUN_LABELS),
]

PLATFORM_METRICS = [
    # queue
    MetricSpec("oppen_queue_pending_runs", "gauge", "Flow runs scheduled or pending in the queue.", ("pool", "queue")),
    MetricSpec("oppen_queue_late_runs", "gauge",
               "Pending runs in Prefect's Late state: past their start time by more than the server's late threshold "
               "(PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS).", ("pool", "queue")),
    MetricSpec("oppen_queue_running_runs", "gauge", "Flow runs running from the queue.", ("pool", "queue")),
    MetricSpec("oppen_queue_oldest_wait_seconds", "gauge", "How long the longest-waiting due run has waited.",
               ("pool", "queue")),
    MetricSpec("oppen_queue_queued_cost_usd", "gauge", "Sum of the pending runs' quoted costs.", ("pool", "queue")),
    MetricSpec("oppen_queue_held_usd", "gauge", "What the pending runs hold of their budgets.", ("pool", "queue")),
    MetricSpec("oppen_pool_online_workers", "gauge", "Workers polling the pool.", ("pool",)),
    # budgets
    MetricSpec("oppen_budget_amount_usd", "gauge",
               "A budget's amount (experiment is empty for a team-wide budget; period: total or monthly).",
               ("team", "experiment", "period")),
    MetricSpec("oppen_budget_spent_usd", "gauge", "Charged against the budget (this month for monthly ones).",
               ("team", "experiment", "period")),
    MetricSpec("oppen_budget_held_usd", "gauge", "Held against the budget by running and queued runs.",
               ("team", "experiment", "period")),
    # outcomes
    MetricSpec("oppen_flow_runs_finished_total", "counter",
               "Flow runs of a deployment (flow/deployment) in a final state, by state, as Prefect counts them; "
               "never decreases while the exporter runs.", ("deployment", "state_type", "state_name")),
    # the platform exporter's own polls (source: queues, workers, budgets, outcomes); a failed source's series
    # are left out rather than served stale
    MetricSpec("oppen_exporter_poll_success", "gauge", "1 when the latest poll of the source worked, else 0.",
               ("source",)),
    MetricSpec("oppen_exporter_last_success_timestamp_seconds", "gauge",
               "Unix time of the source's latest successful poll.", ("source",)),
    MetricSpec("oppen_exporter_poll_duration_seconds", "gauge", "How long the source's latest poll took.",
               ("source",)),
]

ALL = {spec.name: spec for spec in RUN_METRICS + PLATFORM_METRICS}
# Prefect's own /api/metrics (PREFECT_SERVER_METRICS_ENABLED) and Prometheus' `up` are used too.
EXTERNAL_PREFIXES = ("prefect_", "up", "process_", "python_")
