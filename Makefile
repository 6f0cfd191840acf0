test:
	scripts/test

run:
	scripts/run $(ARGS)

protos:
	scripts/generate-protos

# The bench suite (bench/README.md): this proxy vs etcd's Go proxy vs etcd
# directly. Flags go to bench/run.py through ARGS, e.g. ARGS="--workloads W1,W4".
bench:
	scripts/ensure-deps run
	bench/setup.sh
	.venv/bin/python bench/run.py $(ARGS)

bench-quick:
	scripts/ensure-deps run
	bench/setup.sh
	.venv/bin/python bench/run.py --quick $(ARGS)

# The Debian package (debian/): builds dist-deb/etcdgrpcproxy_<version>_all.deb
# from Debian's packages only (build dependencies installed with apt-get, test
# suite run under Debian's python3 unless DEB_BUILD_OPTIONS=nocheck), then lintian.
deb:
	scripts/deb-build

# The test suite under Debian's python3 and Debian's libraries (as in the
# package build), e.g. make test-debian ARGS=tests.test_tls
test-debian:
	scripts/test-debian $(ARGS)

# Builds the package, installs it, runs it as the service would against a local
# etcd, purges it (scripts/deb-test). As root on a throwaway bookworm machine.
deb-test:
	scripts/deb-test

.PHONY: test run protos bench bench-quick deb deb-test test-debian
