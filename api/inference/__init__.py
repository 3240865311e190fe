"""The inference core: every inference request, whatever its route or transport, is admitted by
one admission step (`admission.py`), relayed by one relay (`forwarder/relay.py`) and answered
in its route's shape (`call.py`, `llm_engine.py`). `forwarder/paths.py` is the table of the
inference routes; `asgi.py` and `api/lane/front.py` are the two transports that carry them."""
