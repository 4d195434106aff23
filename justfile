# fairdistill tasks (https://just.systems); each mirrors a script under scripts/.

setup:
    bash scripts/setup.sh

demo *ARGS:
    bash scripts/demo.sh {{ARGS}}

test *ARGS:
    bash scripts/test.sh {{ARGS}}

lint:
    .venv/bin/ruff check . && .venv/bin/ruff format --check .

bench NAME:
    .venv/bin/fair bench {{NAME}} --json
