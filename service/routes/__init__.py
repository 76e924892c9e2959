"""The HTTP routes, one module per family: ops (health, readiness, metrics, reload, playground),
models (what is served), inference (POST /models/{name}). service/app.py assembles them."""
