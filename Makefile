# kpcast: the two commands are `make demo` and `make test`; both create the venv if needed.
PY := .venv/bin/python
export OMP_WAIT_POLICY := PASSIVE

.PHONY: venv demo test test-fast lint bench bench-val train train-256 train-expr quantize clean

venv: .venv/.installed

.venv/.installed: requirements.txt package-lock.json
	bash .ci/setup.sh
	touch $@

demo: venv
	$(PY) -m bench.demo

# two workers (pytest-xdist), a test module's tests on one of them (its module fixtures start once)
test: venv
	$(PY) -m pytest -q -n 2 --dist loadscope

# the same without the modules that start real calls, processes or network peers (marked `call`): about a minute
test-fast: venv
	$(PY) -m pytest -q -n 2 --dist loadscope -m "not call"

lint: venv
	$(PY) -m ruff check .

# the benchmarks on the bundled clip (fast); bench-val: on the validation split of ../shared/data
bench: venv
	$(PY) -m bench.quality --data assets --split all --size 64 128 256 --json out/bench/quality.json --png out/bench/quality.png
	$(PY) -m bench.bandwidth --data assets --split all --json out/bench/bandwidth.json --png out/bench/bandwidth.png
	$(PY) -m bench.expression --data assets --split all --size 64 128 256 --json out/bench/expression.json --png out/bench/expression.png
	$(PY) -m bench.latency --json out/bench/latency.json --png out/bench/latency.png
	$(PY) -m bench.concurrency --calls 4 --json out/bench/concurrency.json --png out/bench/concurrency.png
	$(PY) -m bench.fuzz --messages 100000 --json out/bench/fuzz.json
	$(PY) -m bench.hostile --json out/bench/hostile.json --png out/bench/hostile.png
	@if [ "$$(id -u)" = 0 ]; then $(PY) -m bench.playout --sweep --json out/bench/playout.json --png out/bench/playout.png; \
	else echo "bench.playout skipped: it creates network namespaces and needs root"; fi
	@if [ "$$(id -u)" = 0 ]; then $(PY) -m bench.browser --json out/bench/browser.json --png out/bench/browser.png \
	    --screenshot out/bench/browser_call.png; else echo "bench.browser skipped: it creates network namespaces and needs root"; fi

bench-val: venv
	$(PY) -m bench.quality --data ../shared/data --split val --size 64 128 256 --json out/bench/quality_sizes.json --png out/bench/quality256.png
	$(PY) -m bench.bandwidth --data ../shared/data --split val --json out/bench/bandwidth64.json --png out/bench/bandwidth64.png
	$(PY) -m bench.bandwidth --data ../shared/data --split val --size 256 --json out/bench/bandwidth256.json --png out/bench/bandwidth256.png
	$(PY) -m bench.forecast --data ../shared/data --json out/bench/forecast.json --png out/bench/forecast.png
	$(PY) -m bench.expression --data ../shared/data --split val --size 64 128 256 --json out/bench/expression_val.json --png out/bench/expression_val.png

train: venv
	$(PY) -m models.fomm.train --data ../shared/data --kinds face --size 64 --out runs/face64 --minutes 60 --resume

# the 256x256 model: the 64 model's detector (frozen), dense motion and generator, plus the full-resolution refiner
train-256: venv
	$(PY) -m models.fomm.train --data ../shared/data --kinds face --size 256 --init models/weights/fomm_face64.pt \
	    --freeze kp_detector --out runs/face256 --minutes 70 --batch 6 --lr 1e-4 --val-every 200 --resume

# The shipped models (expression campaign): one 256 run with keypoints anchored to dlib eye/mouth
# landmarks; 64 and 128 are derived from it (one detector). Resumes from the shipped checkpoint
# (it is the run's last.pt), so each session continues the campaign; ends after --minutes of wall time.
train-expr: venv
	@test -f cache/landmarks_face256.npz || $(PY) -m models.landmarks --data ../shared/data --out cache/landmarks_face256.npz
	@mkdir -p runs/expr256 && (test -f runs/expr256/last.pt || cp models/weights/fomm_face256.pt runs/expr256/last.pt)
	$(PY) -m models.fomm.train --data ../shared/data --kinds face --size 256 --landmarks cache/landmarks_face256.npz \
	    --out runs/expr256 --minutes $${MINUTES:-100} --batch 6 --lr 1e-4 --val-every 500 --resume
	cp runs/expr256/last.pt models/weights/fomm_face256.pt
	$(PY) -m models.fomm.derive --src models/weights/fomm_face256.pt --size 64 --out models/weights/fomm_face64.pt
	$(PY) -m models.fomm.derive --src models/weights/fomm_face256.pt --size 128 --out models/weights/fomm_face128.pt
	$(MAKE) quantize

# int8 calibration ranges of the shipped render graphs (models/weights/*.int8.json), measured on
# training clips; the receiver finds them by the weights' fingerprint. Re-run after any retraining.
quantize: venv
	$(PY) -m models.fomm.quantize --data ../shared/data --weights models/weights/fomm_face256.pt \
	    models/weights/fomm_face128.pt models/weights/fomm_face64.pt

clean:
	rm -rf out .pytest_cache
