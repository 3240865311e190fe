"""The web UI: server-rendered pages and small static assets, mounted by the api."""
