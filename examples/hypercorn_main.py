"""hypercorn with several workers and a hub in the launching process:

    python hypercorn_main.py      (from examples/; EXAMPLE_PORT, EXAMPLE_WORKERS)

hypercorn starts its workers with multiprocessing's spawn, which imports
this module again in each of them: the hub is created only under
``if __name__ == "__main__":``.  Each worker connects in the app's lifespan
(asgi_app.py).  (Or run ``python -m clusterhub serve @web-example --handlers
web_hub:setup_master`` beside ``hypercorn --workers 4 asgi_app:app``.)
"""

from __future__ import annotations

import os

import web_hub
from hypercorn.config import Config
from hypercorn.run import run

import clusterhub

if __name__ == "__main__":
    config = Config()
    config.application_path = "asgi_app:app"
    config.bind = [f"127.0.0.1:{os.environ.get('EXAMPLE_PORT', '8000')}"]
    config.workers = int(os.environ.get("EXAMPLE_WORKERS", "4"))
    with clusterhub.Hub(address=web_hub.ADDRESS) as hub:
        web_hub.setup_master(hub)
        run(config)
