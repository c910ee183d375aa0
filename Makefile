# The two commands of the README:
#   make demo   -- set up .venv (first time) and replay the repository's routing trace through every policy
#   make test   -- set up .venv (first time) and run the test suite (fails when no test ran)
VENV ?= .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-12)

.PHONY: demo test setup
setup: $(STAMP)

$(STAMP):
	bash scripts/setup_env.sh $(VENV)
	touch $@

demo: $(STAMP)
	$(VENV)/bin/sglang-xshare replay --ep-size 8 --also xshare_ep,oea_simple

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -p no:logging
