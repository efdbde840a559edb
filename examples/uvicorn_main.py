"""uvicorn with several workers and a hub in the launching process:

    python uvicorn_main.py        (from examples/; EXAMPLE_PORT, EXAMPLE_WORKERS)

uvicorn starts its workers with multiprocessing's spawn, which imports this
module again in each of them: the hub is created only under
``if __name__ == "__main__":``.  Each worker connects in the app's lifespan
(asgi_app.py).  (Or run ``python -m clusterhub serve @web-example --handlers
web_hub:setup_master`` beside ``uvicorn --workers 4 asgi_app:app``.)
"""

from __future__ import annotations

import os

import uvicorn
import web_hub

import clusterhub

if __name__ == "__main__":
    with clusterhub.Hub(address=web_hub.ADDRESS) as hub:
        web_hub.setup_master(hub)
        uvicorn.run("asgi_app:app", host="127.0.0.1", port=int(os.environ.get("EXAMPLE_PORT", "8000")),
                    workers=int(os.environ.get("EXAMPLE_WORKERS", "4")), log_level="info")
