"""Protobuf modules generated from protos/ by scripts/generate-protos. Never edit by hand."""
