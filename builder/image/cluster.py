"""Xinference's distributed mode as compose.xinference-cluster.yaml and k8s/xinference-cluster/ run it.

One place for the layout both renders share; every value reaches the containers as an environment
variable that builder/runtime/xinference/cluster.py reads (it keeps the same defaults).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class XinferenceCluster:
    workers: int = 2
    replicas: int = 2  # of the model; the supervisor waits for `workers` and Xinference puts one on each
    supervisor_port: int = 19997  # actor RPC, inside the cluster's network only
    worker_port: int = 30001  # actor RPC, inside the cluster's network only
    metrics_port: int = 30002  # Prometheus metrics of a worker (per-replica request counters)
    worker_grace: int = 30  # seconds between SIGTERM and SIGKILL: leave (deregister), then exit
    home_size: str = "1Gi"  # Kubernetes: a worker's home (registration, recovery state, logs)


CLUSTER = XinferenceCluster()
