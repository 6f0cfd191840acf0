"""The proxy's side toward etcd: endpoints and the calls made to them."""
