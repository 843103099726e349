"""covspec.edge_runtime: the edge side (target VLM) serving verification over ZeroMQ."""
