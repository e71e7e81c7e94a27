-- One Postgres for both servers: Prefect uses the database named by POSTGRES_DB, MLflow this one.
CREATE DATABASE mlflow;
