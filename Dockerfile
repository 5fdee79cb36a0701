# Production image: the official Airflow image plus this project's pinned requirements and package.
# The tag must equal the apache-airflow pin in requirements.txt (tests/test_docker_compose.py checks it).
FROM apache/airflow:3.3.2

# The project sits in AIRFLOW_HOME (/opt/airflow) with dags/, plugins/ and include/ side by side: the
# package resolves include/config/*.yaml and include/templates relative to its source tree
# (defender_servicenow.settings.PROJECT_ROOT), so it is installed in editable mode from here.
WORKDIR /opt/airflow

# Requirements first: this layer is rebuilt only when the pins change. requirements-image.txt keeps the
# image's own Airflow (and its constraint-resolved libraries); requirements.txt/constraints.txt are for
# the embedded venv install and would fight the image's extra providers.
COPY --chown=airflow:0 requirements-image.txt requirements.txt ./
RUN pip install --no-cache-dir -r requirements-image.txt

COPY --chown=airflow:0 pyproject.toml README.md ./
COPY --chown=airflow:0 plugins/defender_servicenow ./plugins/defender_servicenow
COPY --chown=airflow:0 include ./include
COPY --chown=airflow:0 dags ./dags
# --no-deps: every dependency is already pinned above; this only registers the provider entry point
# (the servicenow and defender_iot connection types in the UI).
RUN pip install --no-cache-dir --no-deps -e .
