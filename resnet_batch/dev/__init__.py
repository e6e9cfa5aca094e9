"""Tools for trying the job on one machine: sample photos, a local multi-node Ray cluster, the cluster demo."""
