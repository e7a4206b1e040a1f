"""The internal ASGI app: ops dashboard, metrics, and the job API / webhook."""
