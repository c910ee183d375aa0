"""The serving benchmark's parts (``bench/serve.py``, ``bench/serve_correctness.py``): model folders
of real MoE shapes, server configurations, the server process life cycle, SGLang's own load
generator and the live-metrics scrape. Importing it does not import SGLang or torch."""
