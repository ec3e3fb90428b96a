"""Serving: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over a continuous-batching scheduler."""
