# gunicorn reads this file from the current folder: serve where gateway.ini's [server:main]
# says, with the gateway's logging (README "Serving").
from meetinity_gateway.gunicorn_conf import *  # noqa: F401,F403
