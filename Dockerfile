# The usermgmt image: the `usermgmt` CLI (worker, migrate, operator commands).
#   docker build -t usermgmt:local .
#   docker run --rm usermgmt:local usermgmt --help
# Two stages: build a wheel (no compilers needed: every dependency ships wheels),
# then install it into a slim runtime that runs as an unprivileged user.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
# One import name: usermgmt/ holds symlinks to the four folders below (COPY keeps them).
COPY usermgmt ./usermgmt
COPY domain ./domain
COPY persistence ./persistence
COPY workers ./workers
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    USERMGMT_LOG_FORMAT=json \
    USERMGMT_DATABASE_URL=sqlite:////data/usermgmt.db
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin usermgmt \
    && mkdir -p /data \
    && chown usermgmt /data
USER usermgmt
WORKDIR /data
# /data holds the SQLite database (mount a volume there); 9108 is the metrics port
# used by docker-compose.yml (`usermgmt worker --metrics-port 9108`).
VOLUME ["/data"]
EXPOSE 9108
CMD ["usermgmt", "worker"]
