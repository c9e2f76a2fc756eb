"""The web console: server-rendered pages over the API's own functions, at `/` of the same app (mount.py wires it).
Nothing is imported here: web/deps.py reads the session module, and the pages import web/deps.py."""
