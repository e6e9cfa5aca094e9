"""The embed job: plan the input, read and decode shards, run ResNet-50 in actor pools, reconcile and report."""
