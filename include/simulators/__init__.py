"""Faithful simulators of ServiceNow and Defender for IoT (FastAPI apps run by uvicorn on 127.0.0.1)."""
