# MLflow server with the PostgreSQL driver (the upstream image has none).
#   docker build -f infra/mlflow.Dockerfile -t REGISTRY/oppen-mlflow:3.17.2 infra/
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.11
USER 10001:10001
