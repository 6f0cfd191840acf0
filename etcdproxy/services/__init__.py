"""The etcd v3 services as clients see them, one module per concern."""
