# kubemta container image: wheels built in one stage, a slim runtime in the next.
#
# Runs as the fixed non-root UID/GID 10001, needs no writable path but the
# spool volume (/var/spool/kubemta) and /tmp, listens only on unprivileged
# ports (the Service maps 25/587/465 to 2525/2587/2465), and `mta` itself is
# PID 1: it handles SIGTERM (stop accepting, finish, drain on scale-down).
#
# Dependencies come at the exact versions of constraints.txt, the ones CI
# tests (setup.cfg only gives ranges).
#
# The base is named once so that every stage uses the same interpreter (the
# virtualenv built in the first stage is copied into the second):
#   podman build --build-arg PYTHON_IMAGE=localhost/pybase ...
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md constraints.txt ./
COPY spool ./spool
COPY mta ./mta
RUN python3 -m venv /opt/kubemta \
 && /opt/kubemta/bin/pip install --upgrade pip wheel \
 && /opt/kubemta/bin/pip wheel -c constraints.txt --wheel-dir /wheels . \
 && /opt/kubemta/bin/pip install --no-index --find-links /wheels -c constraints.txt kubemta \
 && /opt/kubemta/bin/pip uninstall -y pip wheel setuptools \
 && /opt/kubemta/bin/python3 -m compileall -q /opt/kubemta \
 && /opt/kubemta/bin/mta check-config >/dev/null

FROM ${PYTHON_IMAGE}
ARG UID=10001
LABEL org.opencontainers.image.title="kubemta" \
      org.opencontainers.image.description="A self-hosted SMTP mail transfer agent for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
# No configuration is baked in: `podman run IMAGE` starts on the embedded default
# (loopback listener, spool under the working directory).  The Kubernetes one
# (manifests/mta.yaml) names a StatefulSet pod and its Secrets, so it comes
# with the manifests' ConfigMap, which sets MTA_CONFIG; elsewhere mount a file
# and pass -e MTA_CONFIG=... .
ENV PATH=/opt/kubemta/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/kubemta /opt/kubemta
RUN mkdir -p /var/spool/kubemta \
 && chown ${UID}:${UID} /var/spool/kubemta \
 && chmod 0750 /var/spool/kubemta \
 && rm -rf /root/.cache /var/cache/* /var/lib/apt/lists/* /tmp/*
USER ${UID}:${UID}
WORKDIR /var/spool/kubemta
VOLUME ["/var/spool/kubemta"]
EXPOSE 2525 2587 2465 8080 8025
STOPSIGNAL SIGTERM
ENTRYPOINT ["mta"]
CMD ["serve"]
