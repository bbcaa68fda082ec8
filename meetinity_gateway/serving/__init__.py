"""How the gateway is served: the hardened waitress (:mod:`.hardened`), its life from
start-up line to drain (:mod:`.lifecycle`), and the worker-process servers granian and
gunicorn (:mod:`.launchers`). :mod:`meetinity_gateway.server` puts them together."""
