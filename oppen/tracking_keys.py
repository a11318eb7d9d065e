"""The names Oppen gives things in MLflow: metric keys, params and tags, in one place.

MLflow's UI draws a run's metrics in sections named by the prefix before the first "/", so every
key here has one: `train/` and `val/` (the training loop, per N steps and per epoch), `test/` or
`eval/` (the held-out evaluation, named after the workload's own metric), `cost/` (the meter while
training, the settlement at the end), `speed/` (what the next quote of the same request reads),
`utilization/` (the run's means and peaks) and `system/` (MLflow's own system-metrics monitor).

What does not change during a run (its quote, its cap, its rates, its shape) is a param, never a
step-0 metric: one value drawn as a chart tells nobody anything. Every writer and every reader of
these names imports them from here, so a renamed key cannot leave a reader behind.
"""

from __future__ import annotations

# --- training (tasks.tracking.MlflowMetricsCallback, tasks.training_tasks) --------------------------
TRAIN_LOSS = "train/loss"  # smoothed over run.log_every_steps, logged every log_every_steps steps
TRAIN_EPOCH_LOSS = "train/epoch_loss"  # the mean loss of an epoch, at its last step
EPOCHS_DONE = "train/epoch"  # epochs completed, at each epoch's last step
EPOCH_SECONDS = "train/epoch_seconds"
SAMPLES_PER_SECOND = "train/samples_per_second"
STEPS_COMPLETED = "train/steps_completed"
RESUMED_FROM_STEP = "train/resumed_from_step"  # > 0: this attempt resumed from a checkpoint
TRAIN_SECONDS = "train/seconds"
CALLBACK_SECONDS = "train/callback_seconds"  # the loop's time in callbacks (metering, logging, progress)

# --- cost while training (tasks.cost_tasks.PrefectCostReporter) --------------------------------------
COST_ACCRUED = "cost/accrued_usd"  # the run so far, earlier attempts included: every N steps and each epoch
COST_FORECAST = "cost/forecast_usd"  # the meter's forecast of the run's total
COST_EPOCH = "cost/epoch_usd"  # what each epoch cost on its own (not cumulative), at its last step

# --- cost at settlement (oppen.cost.settlement.RunCost.mlflow_metrics) -------------------------------
COST_TOTAL = "cost/total_usd"  # the run's total over its attempts: the ledger's figure
COST_ATTEMPT = "cost/attempt_usd"  # step = the attempt: each attempt's own part
COST_ATTEMPTS = "cost/attempts"
COST_TRAINING = "cost/training_usd"
COST_ON_DEMAND = "cost/on_demand_usd"
COST_SAVING = "cost/saving_usd"
COST_PER_POINT = "cost/per_point_usd"
COST_QUOTE_ERROR = "cost/quote_error"
COST_FORECAST_EPOCH1 = "cost/forecast_after_epoch1_usd"
COST_FORECAST_ERROR = "cost/forecast_error"
COST_LIMIT = "cost/limit_usd"  # what this attempt was allowed to spend (its hold after top-ups)
COST_CAP_OVERSHOOT = "cost/cap_overshoot_usd"
COST_AT_TRAINING_END = "cost/at_training_end_usd"
COST_TAIL_RESERVE = "cost/tail_reserve_usd"
COST_MAX_STEP = "cost/max_step_usd"
GPU_HOURS = "cost/gpu_hours"
CPU_CORE_HOURS = "cost/cpu_core_hours"
MEMORY_GIB_HOURS = "cost/memory_gib_hours"
PEAK_SECONDS = "cost/peak_seconds"
OFF_PEAK_SECONDS = "cost/off_peak_seconds"
SPOT_INTERRUPTIONS = "cost/spot_interruptions"
SPOT_LOST_SECONDS = "cost/spot_lost_seconds"
SPOT_LOST_USD = "cost/spot_lost_usd"

# --- the run's speed, for the next quote of the same request (tasks.cost_history) ---------------------
SECONDS_PER_SAMPLE = "speed/seconds_per_sample"
EPOCH_OVERHEAD_SECONDS = "speed/epoch_overhead_seconds"
FIXED_OVERHEAD_SECONDS = "speed/fixed_overhead_seconds"
TAIL_SECONDS = "speed/tail_seconds"

# --- utilisation over the run (oppen.cost.utilization.Utilization.as_metrics) ------------------------
CPU_CORES_MEAN = "utilization/cpu_cores_mean"
CPU_CORES_PEAK = "utilization/cpu_cores_peak"
MEMORY_PEAK_GIB = "utilization/memory_peak_gib"
GPU_UTIL_MEAN = "utilization/gpu_mean"  # 0-1
GPU_MEMORY_PEAK_GIB = "utilization/gpu_memory_peak_gib"

# --- params: constants of the run -------------------------------------------------------------------
STEPS_PER_EPOCH_PARAM = "shape.steps_per_epoch"  # lets the next run of the same request be quoted before loading
QUOTE_PARAM_PREFIX = "quote."  # the first attempt's quote: quote.expected_usd, quote.p90_usd, ...
QUOTE_EXPECTED_PARAM = "quote.expected_usd"
QUOTE_P90_PARAM = "quote.p90_usd"
RATE_PARAM_PREFIX = "rate."  # the price book's rates for the request: rate.hourly_usd, rate.off_peak_discount, ...
CAP_PARAM = "cost.max_cost_usd"  # the request's own field, flattened (None: no cap)

# --- tags ---------------------------------------------------------------------------------------------
DESCRIPTION_TAG = "mlflow.note.content"  # MLflow shows it as the run's (and an experiment's) description
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# Opens the experiment on its runs (model training), not on GenAI's traces overview.
MODEL_TRAINING_KIND = "custom_model_development"
# Query parameter of MLflow's UI links: its model-training view instead of the GenAI one.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"

# The prefixes a workload's own metric names use, and their sections.
_SECTIONS = {"train_": "train/", "val_": "val/", "test_": "test/", "eval_": "eval/"}


def metric_key(name: str) -> str:
    """A workload's metric (val_accuracy, test_accuracy, eval_perplexity) as its MLflow key (val/accuracy)."""
    for prefix, section in _SECTIONS.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return section + name[len(prefix):]
    return name


def section_of(key: str) -> str:
    """The section MLflow draws a key in: what comes before the first "/" ("" for an ungrouped key)."""
    head, slash, _ = key.partition("/")
    return head if slash else ""
