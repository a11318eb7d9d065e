"""Prometheus alerts (infra/monitoring/rules) into Prefect: Alertmanager's webhook as Oppen's events.

    payload.py   Alertmanager's webhook payload (version 4) as pydantic models
    mapping.py   a notification's alerts as `oppen.alert.firing` / `oppen.alert.resolved` events (pure)
    receiver.py  the Starlette app and `python -m oppen.alerts.receiver serve`

automations.yaml's "oppen: alert" posts each event to Slack; infra/monitoring/README.md says how
the pieces meet and how quickly an anomaly gets there.
"""
