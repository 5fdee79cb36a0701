"""The sync health page: an Airflow plugin (``plugin.py``) served by the API server from this package."""
