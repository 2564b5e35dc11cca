# The clickpulse worker image (used by docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# README.md* : optional (pyproject's readme); the glob keeps the build working without it.
COPY pyproject.toml README.md* ./
# src/clickpulse/schemas is a symlink to ../../schemas: copy its target too.
COPY schemas ./schemas
COPY src ./src
RUN pip install . \
    && useradd --create-home --uid 10001 clickpulse \
    && mkdir -p /var/lib/clickpulse \
    && chown clickpulse /var/lib/clickpulse

USER clickpulse
ENV CLICKPULSE_DATA_DIR=/var/lib/clickpulse/worker-data
EXPOSE 6066
CMD ["clickpulse", "worker"]
