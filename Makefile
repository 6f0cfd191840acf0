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

.PHONY: test run protos bench bench-quick
