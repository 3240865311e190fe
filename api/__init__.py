"""The FastAPI app: REST, OpenAI and LLM Engine routes, auth and the one error handler."""
