from setuptools import find_packages, setup

setup(
    name="etcdgrpcproxy",
    version="0.1.0",
    description="etcd v3 gRPC proxy on Twisted: watch broadcasting, lease coalescing, read cache",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["etcdproxy", "etcdproxy.*"]) + ["twisted.plugins"],
    # twisted/ and twisted/plugins/ must stay without __init__.py: they extend
    # Twisted's own plugin package instead of shadowing it.
    package_data={"twisted": ["plugins/etcdgrpcproxy.py"]},
    install_requires=[
        "twisted[tls]>=22.4",  # pyOpenSSL, service-identity, idna
        "h2>=4.1,<4.5",  # the releases the HTTP/2 fast path is proven on (etcdproxy/grpc/h2fast.py)
        "protobuf>=4.21",
        "zope.interface",
        "service-identity",
        "prometheus_client",
    ],
)
