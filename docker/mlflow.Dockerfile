# MLflow tracking server with the Postgres driver the official image lacks.
#   docker build -f docker/mlflow.Dockerfile -t octseg-mlflow .
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "psycopg2-binary==2.9.13"
USER 1000
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:5000/health')"]
