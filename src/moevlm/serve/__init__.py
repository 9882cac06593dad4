"""``moevlm serve``: an OpenAI-compatible chat-completions server with continuous batching and a web
page that shows which experts each generated token was routed to (docs/serving.md).

engine.py owns the model on one thread; batch.py keeps the running batch's KV cache; chat.py turns
a request into a job; api.py is the FastAPI app; server.py runs it under uvicorn; page.html is the page.
"""
