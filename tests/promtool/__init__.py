"""promtool unit tests of infra/monitoring/rules (<concern>.test.yaml) and the PromQL helpers the rule and dashboard tests share."""
