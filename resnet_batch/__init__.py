"""resnet-batch: distributed ResNet-50 batch inference on Ray (top-k labels + 2048-d embeddings to Parquet)."""

__version__ = "0.2.0"
