test:
	scripts/test

run:
	scripts/run $(ARGS)

protos:
	scripts/generate-protos

.PHONY: test run protos
