# kpcast image: one image for both ends (python -m receiver / python -m sender).
#   docker compose up --build        (see docker-compose.yml)

# the browser sender's npm packages (GET /send), exactly as locked; the test driver (a dev dependency) stays out
FROM node:20-slim AS web
WORKDIR /web
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund

FROM python:3.11-slim

# opencv-python needs libGL and glib even headless
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
ENV PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE

# requirements.txt pins torch==2.13.0, which on a developer machine is a local CPU wheel. Plain PyPI
# would resolve it to a multi-GB CUDA build, so pip gets the PyTorch CPU index as an extra index and
# installs the 2.13.0+cpu wheel from there (a bare ==2.13.0 pin matches the +cpu local version).
# For a GPU receiver build with TORCH_INDEX=https://download.pytorch.org/whl/cu126 (or the CUDA
# version your driver supports) and keep the GPU reservation in docker-compose.yml.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.txt .
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -r requirements.txt

# the code (and models/weights/ when present; otherwise mount weights and pass --weights)
COPY . .
COPY --from=web /web/node_modules ./node_modules

EXPOSE 8080
CMD ["python", "-m", "receiver", "--host", "0.0.0.0", "--port", "8080"]
