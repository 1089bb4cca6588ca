-- One PostgreSQL server, one database per service (run once, on the first start of the volume).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
