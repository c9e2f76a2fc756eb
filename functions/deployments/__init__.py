"""Private deployments: one base model served by replicas (engine processes) that an autoscaler starts and stops.

config.py      the deployment config users send, its checks, the statuses
autoscaler.py  how many replicas a deployment needs now: a pure function of config, load, replicas and time
routing.py     which replica takes a request (adapter-aware, least loaded)
replica.py     one replica: an engine process started (from a pre-warmed interpreter when there is one),
               watched, drained and stopped
metrics.py     per-deployment time series and the Prometheus collector
runtime.py     the manager that runs in the API process: reconciles the database rows with live replicas,
               applies the autoscaler's decisions, records transitions and meters replica-seconds
"""
