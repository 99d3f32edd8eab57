"""One frozen model serving many prompts over HTTP, in dynamically formed mixed batches.

`registry` (the prompts, a fixed-capacity bank), `engine` (bucketed, precompiled programs),
`batcher` (dynamic batching across prompts), `requests` (request checks), `metrics`
(Prometheus text), `app` (the aiohttp routes), `config` and `server` (`softprompt-jax serve`).
"""
