# The two commands of the README. Both set everything up first.
.PHONY: up test

up:
	scripts/setup.sh
	.venv/bin/vigil up

test:
	scripts/test.sh
