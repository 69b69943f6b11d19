# fuselabel's prediction service on a CPU, as a user without privileges.
#
#   docker build -t fuselabel .
#   docker run --rm -p 8000:8000 -v "$PWD/models/comp5329:/model:ro" fuselabel            # the model mounted
#   docker run --rm -p 8000:8000 -v ... fuselabel --workers 2 --json-logs                 # more serve options
#   docker run --rm -p 8000:8000 -e FUSELABEL_API_KEY="$KEY" -v ... fuselabel             # callers need the key
#
# To bake a model in instead, build an image on top of this one from the model folder:
#   printf 'FROM fuselabel\nCOPY --chown=fuselabel . /model\n' | docker build -t fuselabel-comp5329 -f - models/comp5329

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    MALLOC_ARENA_MAX=2 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

RUN useradd --system --create-home --uid 10001 --shell /usr/sbin/nologin fuselabel

WORKDIR /app
# The lock first: its layer (torch and the rest, about 1 GB with torch's CPU build) is rebuilt only when it changes.
COPY requirements-lock.txt pyproject.toml README.md ./
COPY scripts/setup.sh scripts/setup.sh
COPY src src
RUN VENV=/opt/venv FUSELABEL_TORCH_BUILD=cpu bash scripts/setup.sh

USER fuselabel
# The encoders' runtime and feature cache go here (the model folder may be mounted read-only).
WORKDIR /home/fuselabel
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["fuselabel", "serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
CMD []
