"""Similarity search over an embed output: index build and update, similar, neighbours, gallery, serve."""
