# OpenBao policy of the worker ENROLMENT role (AppRole `enrol-worker`; issue 14, SECURITY.md
# "Service identities and enrolment", case 2). Default deny. A worker replica that finds no
# secret_id of its own logs in with the enrolment credential that `appliance init` left for
# workers only, mints ONE `worker` secret_id for itself (metadata naming where it runs: the
# role's own TTL, uses and CIDRs apply, it cannot widen them), and revokes this token. It reads
# no role_id, lists nothing, destroys nothing, and reaches no key, job or result.
path "auth/approle/role/worker/secret-id" {
  capabilities = ["update"]
  allowed_parameters = {
    "metadata" = []
  }
}

# Its own token: revoked as soon as the replica has its secret_id.
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
