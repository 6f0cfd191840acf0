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

# The soak test (bench/README.md): mixed load against the proxy for 10 minutes
# (soak-ci: 1 minute, as scripts/test runs it); RSS and FDs must stay flat, no
# errors. Flags go to bench/soak.py through ARGS.
soak:
	scripts/ensure-deps test
	.venv/bin/python bench/soak.py --duration 600 $(ARGS)

soak-ci:
	scripts/ensure-deps test
	.venv/bin/python bench/soak.py --duration 60 $(ARGS)

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

# Longer fuzzing of the proxy (tests/test_fuzz.py, hypothesis): 2000 examples per
# test instead of CI's 50, about 10 min on 2 cores. ARGS go to pytest.
fuzz:
	scripts/ensure-deps test
	ETCDPROXY_FUZZ_EXAMPLES=$${ETCDPROXY_FUZZ_EXAMPLES:-2000} ETCDPROXY_FUZZ_RACE_ATTEMPTS=400 \
		PYTHONPATH=$(CURDIR) .venv/bin/python -m pytest -p no:cacheprovider -s tests/test_fuzz.py $(ARGS)

.PHONY: test run protos bench bench-quick soak soak-ci deb deb-test test-debian fuzz
