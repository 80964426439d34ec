# kpcast: the two commands are `make demo` and `make test`; both create the venv if needed.
PY := .venv/bin/python
export OMP_WAIT_POLICY := PASSIVE

.PHONY: venv demo test lint bench bench-val train train-256 clean

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

# the benchmarks on the bundled clip (fast); bench-val: on the validation split of ../shared/data
bench: venv
	$(PY) -m bench.quality --data assets --split all --size 64 128 256 --json out/bench/quality.json --png out/bench/quality.png
	$(PY) -m bench.bandwidth --data assets --split all --json out/bench/bandwidth.json --png out/bench/bandwidth.png
	$(PY) -m bench.latency --json out/bench/latency.json --png out/bench/latency.png
	$(PY) -m bench.concurrency --calls 4 --json out/bench/concurrency.json --png out/bench/concurrency.png
	$(PY) -m bench.fuzz --messages 100000 --json out/bench/fuzz.json
	$(PY) -m bench.hostile --json out/bench/hostile.json --png out/bench/hostile.png
	@if [ "$$(id -u)" = 0 ]; then $(PY) -m bench.playout --sweep --json out/bench/playout.json --png out/bench/playout.png; \
	else echo "bench.playout skipped: it creates network namespaces and needs root"; fi

bench-val: venv
	$(PY) -m bench.quality --data ../shared/data --split val --size 64 128 256 --json out/bench/quality_sizes.json --png out/bench/quality256.png
	$(PY) -m bench.bandwidth --data ../shared/data --split val --json out/bench/bandwidth64.json --png out/bench/bandwidth64.png
	$(PY) -m bench.bandwidth --data ../shared/data --split val --size 256 --json out/bench/bandwidth256.json --png out/bench/bandwidth256.png
	$(PY) -m bench.forecast --data ../shared/data --json out/bench/forecast.json --png out/bench/forecast.png

train: venv
	$(PY) -m models.fomm.train --data ../shared/data --kinds face --size 64 --out runs/face64 --minutes 60 --resume

# the 256x256 model: the 64 model's detector (frozen), dense motion and generator, plus the full-resolution refiner
train-256: venv
	$(PY) -m models.fomm.train --data ../shared/data --kinds face --size 256 --init models/weights/fomm_face64.pt \
	    --freeze kp_detector --out runs/face256 --minutes 70 --batch 6 --lr 1e-4 --val-every 200 --resume

clean:
	rm -rf out .pytest_cache
