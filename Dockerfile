# The gateway's container image: the package installed from this source tree into a
# virtualenv, copied onto a clean base with no compiler, no pip cache and no source tree.
#
#   DOCKER_BUILDKIT=1 docker build -t meetinity-gateway .
#   docker run --rm -p 8080:8080 -e JWT_SECRET=... -e USER_SERVICE_URL=http://users:5001 \
#       --stop-timeout 25 meetinity-gateway
#
# Configuration: the environment (every variable of .env.example), or an ini file of your
# own mounted over /etc/meetinity-gateway/gateway.ini (its .env beside it is read too).
# Stop: SIGTERM, then `drain_seconds` (GATEWAY_DRAIN_SECONDS, 20) for requests in flight;
# give the container a longer grace period (docker --stop-timeout 25, Compose
# stop_grace_period, Kubernetes terminationGracePeriodSeconds).
#
# Where package downloads need a company CA or pip settings, hand them to the build as
# secrets; they are mounted for the one install step and are in no layer of the image:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
#                --secret id=pip.conf,src=/etc/pip.conf -t meetinity-gateway .

# Any Debian-based image with Python 3.9+ and its venv module (python:3.X-slim).
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=secret,id=ca,required=false \
    --mount=type=secret,id=pip.conf,required=false \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ -s /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi; \
    python3 -m venv /opt/meetinity-gateway; \
    /opt/meetinity-gateway/bin/python -m pip install --no-cache-dir \
        --disable-pip-version-check ".[redis]"; \
    /opt/meetinity-gateway/bin/python -m pip uninstall --yes --quiet pip setuptools; \
    mkdir -p /etc/meetinity-gateway; \
    cp gateway.ini .env.example /etc/meetinity-gateway/

FROM ${PYTHON_IMAGE}
# A system user without a login shell or a writable home; the files stay root's.
RUN useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway
COPY --from=build /opt/meetinity-gateway /opt/meetinity-gateway
COPY --from=build /etc/meetinity-gateway /etc/meetinity-gateway
ENV PATH=/opt/meetinity-gateway/bin:$PATH \
    GATEWAY_CONFIG=/etc/meetinity-gateway/gateway.ini \
    GATEWAY_LISTEN=0.0.0.0:8080 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /etc/meetinity-gateway
USER gateway
EXPOSE 8080
# The gateway drains on SIGTERM (waitress; granian and gunicorn stop their workers on it).
STOPSIGNAL SIGTERM
# Liveness on the port GATEWAY_LISTEN names, from inside the container (no curl needed).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; port = os.environ.get('GATEWAY_LISTEN', ':8080').split()[0].rsplit(':', 1)[1]; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % port, timeout=2)"]
CMD ["meetinity-gateway", "serve"]
