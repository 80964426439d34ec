# kpcast: the two commands are `make demo` and `make test`; both create the venv if needed.
PY := .venv/bin/python
export OMP_WAIT_POLICY := PASSIVE

.PHONY: venv demo test lint bench train clean

venv: .venv/.installed

.venv/.installed: requirements.txt
	bash .ci/setup.sh
	touch $@

demo: venv
	$(PY) -m bench.demo

test: venv
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check .

bench: venv
	$(PY) -m bench.quality --data ../shared/data --split val --json out/bench/quality.json --png out/bench/quality.png
	$(PY) -m bench.bandwidth --data ../shared/data --split val --json out/bench/bandwidth.json --png out/bench/bandwidth.png
	$(PY) -m bench.latency --json out/bench/latency.json --png out/bench/latency.png

train: venv
	$(PY) -m models.fomm.train --data ../shared/data --kinds face --size 64 --out runs/face64 --minutes 60 --resume

clean:
	rm -rf out .pytest_cache
