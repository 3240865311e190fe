"""The fast lane, a transport for the inference routes: `front` (the connection protocol, its
narrow head parser and the `Client` it is to inference calls), `glue` (uvicorn's internals it
hands other requests to)."""
