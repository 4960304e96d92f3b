"""The local stack's moving parts: private PKI, TLS-only Redis with ACL roles, OpenBao.

Used by `appliance up`/`down` and by the integration-test fixtures. Every service listens on a
loopback port chosen by the caller, keeps its files under one state directory, and is stopped
through its pid file.
"""

from __future__ import annotations

from .enrolment import ENROL_ROLE, enrolment_file, ensure_enrolment_credential
from .export import export_files
from .openbao import (
    BaoHandle,
    Bootstrap,
    audit_log_path,
    bootstrap,
    configure_redis_leases,
    credential_files,
    data_dir,
    generate_root_token,
    open_openbao,
    openbao_argv,
    openbao_env,
    operator_token_file,
    prepare_openbao,
    start_openbao,
    stop_openbao,
    unseal_keys_file,
)
from .pki import CLIENT_ROLES, Pki, ensure_pki, write_private
from .procs import (
    StackError,
    exec_service,
    free_port,
    pid_alive,
    read_pid_file,
    start_detached,
    stop_by_pid_file,
    wait_for_port,
)
from .redis_relay import relay_argv, relay_env, relay_port, start_relay, stop_relay
from .redis_server import (
    REDIS_ENV,
    RedisHandle,
    lease_rules,
    load_acl_policy,
    load_leased_roles,
    password_file,
    prepare_redis,
    redis_argv,
    redis_dir,
    render_acl,
    start_redis,
    stop_redis,
)
from .users import RunAs, check_reachable, service_users, shared_gid

__all__ = [
    "CLIENT_ROLES",
    "ENROL_ROLE",
    "REDIS_ENV",
    "BaoHandle",
    "Bootstrap",
    "Pki",
    "RedisHandle",
    "RunAs",
    "StackError",
    "audit_log_path",
    "bootstrap",
    "check_reachable",
    "configure_redis_leases",
    "credential_files",
    "enrolment_file",
    "ensure_enrolment_credential",
    "exec_service",
    "export_files",
    "open_openbao",
    "openbao_argv",
    "openbao_env",
    "prepare_openbao",
    "prepare_redis",
    "redis_argv",
    "redis_dir",
    "relay_argv",
    "relay_env",
    "relay_port",
    "ensure_pki",
    "free_port",
    "lease_rules",
    "load_acl_policy",
    "load_leased_roles",
    "password_file",
    "pid_alive",
    "read_pid_file",
    "render_acl",
    "service_users",
    "shared_gid",
    "data_dir",
    "generate_root_token",
    "operator_token_file",
    "unseal_keys_file",
    "start_detached",
    "start_openbao",
    "start_redis",
    "start_relay",
    "stop_by_pid_file",
    "stop_openbao",
    "stop_redis",
    "stop_relay",
    "wait_for_port",
    "write_private",
]
