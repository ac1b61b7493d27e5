# The torpor operator image: kopf and the torch-free part of torpor, no torch.
# Build: docker build -t torpor-operator:dev .   (untested here: no container engine)
# The chart runs it as user 10001 with a read-only root filesystem.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY operator ./operator
# Wheels of torpor and of the operator extra's dependencies only: torch is never pulled in.
RUN pip install --no-cache-dir --upgrade pip==24.3.1 \
 && pip wheel --no-cache-dir --wheel-dir /wheels ".[operator]"

FROM python:3.11-slim
RUN groupadd --gid 10001 torpor \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin torpor
COPY --from=build /wheels /wheels
# pip compiles the .pyc files here, so nothing is written at run time (read-only root).
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
 && rm -rf /wheels \
 && python -c "import torpor_operator, kopf; import importlib.util as u; assert u.find_spec('torch') is None"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# /healthz (liveness) and /metrics (Prometheus); TORPOR_HEALTH_PORT, TORPOR_METRICS_PORT.
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "torpor_operator"]
