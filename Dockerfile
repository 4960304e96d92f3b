# The appliance's one image: every service of docker-compose.yml runs from it (issue 14).
#
#   BASE=$(packaging/base-image.sh)          # appliance-base:<key>, made by debootstrap, never pulled
#   docker compose build                      # or: docker build --build-arg BASE=$BASE \
#                                             #   --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt \
#                                             #   --network host -t appliance .
#
# No `# syntax=` line: BuildKit would try to pull that frontend, and no registry is reachable.
# The image holds no secret and no key: `appliance prepare` and `appliance init` make them at run
# time on the stack's volumes.
ARG BASE

# --- build: the project as a wheel, installed with its dependencies into /opt/venv ---------------
FROM ${BASE} AS build
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY policies /src/policies
COPY sandbox /src/sandbox
COPY appliance /src/appliance
# The host's CA bundle (pip reaches the index through a TLS-inspecting proxy) arrives as a
# BuildKit secret: mounted for this RUN only, in no layer. pip reaches the index through the
# build's network (`build: network: host`): the private engine forwards nothing.
RUN --mount=type=secret,id=pip_ca,required=true \
    export PIP_CERT=/run/secrets/pip_ca PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    && /opt/venv/bin/pip wheel --quiet --no-deps --wheel-dir /wheels /src \
    && /opt/venv/bin/pip install --quiet /wheels/*.whl \
    && /opt/venv/bin/appliance --help >/dev/null \
    && /opt/venv/bin/bao version

# --- final: the venv, the service users, tini ------------------------------------------------------
FROM ${BASE}
# Fixed ids, so that volumes keep their owners across rebuilds and upgrades (the files of each
# service belong to its user; `appliance prepare` finds these users by name and makes none).
RUN groupadd --system --gid 910 appliance \
    && for entry in redis:901 bao:902 api:903 worker:904 flower:905; do \
         name=appliance-${entry%%:*}; id=${entry##*:}; \
         groupadd --system --gid "$id" "$name" \
         && useradd --system --uid "$id" --gid "$id" --no-create-home --home-dir /nonexistent \
              --shell /usr/sbin/nologin "$name" || exit 1; \
       done \
    && usermod --append --groups appliance appliance-api \
    && usermod --append --groups appliance appliance-worker \
    && mkdir -p /state && chmod 0711 /state
COPY --from=build /opt/venv /opt/venv
COPY packaging/entrypoint.sh /usr/local/bin/appliance-entrypoint
COPY packaging/entrypoint-healthcheck.py /usr/local/bin/appliance-healthcheck
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    APPLIANCE_STATE=/state \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /state
# tini reaps zombies and forwards signals; the entrypoint only prepares what a service needs
# as root (the worker's memory cgroup) and then execs `appliance ...`.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/appliance-entrypoint"]
CMD ["appliance", "--help"]
LABEL org.opencontainers.image.title="sandbox-appliance"
