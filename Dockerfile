# syntax=docker/dockerfile:1
# The gateway (and the simulator, for the compose `demo` profile) in one image.
#   docker build -t fleet-gateway .
#   docker run --env-file .env fleet-gateway            # see docker-compose.yml for the variables
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Runtime dependencies exactly as pyproject.toml lists them (a layer that
# changes only when they do).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY gateway/ gateway/
COPY device_sim/ device_sim/
COPY config/gateway.yaml config/fleet.yaml config/

# An unprivileged user; /var/lib/gateway holds the journal and the reservations
# database (a named volume in docker-compose.yml inherits this ownership).
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/gateway \
    && chown gateway:gateway /var/lib/gateway
USER gateway

# config/gateway.yaml is for local runs (dev_mode: true); the environment
# turns it into a production configuration. Secrets come from the environment only.
ENV GATEWAY__DEV_MODE=false \
    GATEWAY__HTTP__HOST=0.0.0.0 \
    GATEWAY__HTTP__PORT=8080 \
    GATEWAY__STATE__DIR=/var/lib/gateway \
    GATEWAY__FLEET__FILE=/app/config/fleet.yaml

EXPOSE 8080
ENTRYPOINT ["python", "-m", "gateway", "--config", "/app/config/gateway.yaml"]
CMD ["run"]
