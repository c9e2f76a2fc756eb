"""Private deployments: one base model served by replicas (engine processes) that an autoscaler starts and stops.

config.py      the deployment config users send and its checks (refusals naming the field at fault)
status.py      the statuses, how the runtime derives them from its replicas, and every transition's record
rules.py       what a deployment in each status may still do, and the refusal it gives otherwise
autoscaler.py  how many replicas a deployment needs now: a pure function of config, load, replicas and time
routing.py     which replica takes a request (adapter-aware, least loaded)
replica.py     one replica: an engine process started, watched, drained and stopped
prewarm.py     the pre-warmed interpreter a replica starts from, and when the runtime keeps one
launcher.py    a replica's process before it becomes an engine (the imports, then one command on stdin)
live.py        what the runtime holds of each deployment (its replicas, its status) and the lock over it
lifecycle.py   the runtime's side of the replicas: start, take in when ready, drain, stop, reap, health polls
leases.py      the request path: a request leases a ready replica, or waits while one starts
records.py     the replicas and every API process's load as rows all of them see; what the API shows of them
remote_leases.py  the request path of an API process that does not run the replicas: by their published address
peers.py       what the runtime exchanges with the other API processes each tick (through records.py)
metering.py    replica time on the ledger, and its price
suspension.py  deployments held in Standby while their tenant cannot pay (no credit, no card), and back after
metrics.py     per-deployment time series and the Prometheus collector, in the database
sampling.py    the health figures sampled once per tick (replicas busy, CPU share)
snapshot.py    the replicas' process ids, read under the runtime's lock (tests, operators)
runtime.py     the manager that runs in every API process; the one holding the deployments lease
               (app/control_lease.py) reconciles the database rows with live replicas, applies the autoscaler's
               decisions and records transitions; DeploymentEngine serves one deployment through the Engine protocol
"""
