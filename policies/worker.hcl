# OpenBao policy of the worker service (AppRole `worker`). Default deny: anything not listed is
# refused. The worker opens jobs, runs them and seals their results; it never sees the client
# registry and cannot open results once sealed.

# Open a job: unwrap the job's data key (sealed by the API under the job's context).
path "transit/decrypt/jobs" {
  capabilities = ["update"]
}

# Seal a result: a fresh data key bound to the result key.
path "transit/datakey/plaintext/results" {
  capabilities = ["update"]
}

# Workflows: seal a step's value for the next step, and open the value carried into a step.
path "transit/datakey/plaintext/carry" {
  capabilities = ["update"]
}
path "transit/decrypt/carry" {
  capabilities = ["update"]
}

# Check the API's signature on a task message: read the Ed25519 key's public halves (pinned
# per version) and its minimum version; nothing secret is readable here.
path "transit/keys/task-messages" {
  capabilities = ["read"]
}
# Messages signed before issue 16 carry an HMAC of `task-signing`: checked by transit.
path "transit/verify/task-signing" {
  capabilities = ["update"]
}
# Sign audit-log checkpoints.
path "transit/sign/audit" {
  capabilities = ["update"]
}

# Anchor audit-log checkpoints (issue 12): create a new numbered anchor and read the existing ones.
# Never `update` or `delete`: KV v2 asks for `update` to write a path that exists (its existence
# check), so an anchor once written cannot be rewritten by this service, nor by a thief of it.
path "kv/data/appliance/audit/anchors/*" {
  capabilities = ["create", "read"]
}
path "kv/metadata/appliance/audit/anchors" {
  capabilities = ["list"]
}
path "kv/metadata/appliance/audit/anchors/" {
  capabilities = ["list"]
}

# Task secrets a client's policy allows a job to use.
path "kv/data/appliance/secrets/*" {
  capabilities = ["read"]
}

# Its Redis user: a short-lived one from the database engine (rules from policies/redis-acl.json),
# renewed at half-life and replaced when renewal fails (a revoked lease) or nears its max TTL.
path "database/creds/worker" {
  capabilities = ["read"]
}
path "sys/leases/renew" {
  capabilities = ["update"]
}

# Its own next secret_id (issue 12, finding 5): at each login the service mints the single-use,
# expiring secret_id of its next login, for its own role only (never another service's), with
# metadata naming where it runs. Nothing else of the AppRole: no role_id, no list, no destroy.
path "auth/approle/role/worker/secret-id" {
  capabilities = ["update"]
  allowed_parameters = {
    "metadata" = []
  }
}

# Its own token: the AppRole tokens carry no `default` policy, so these are listed here.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
