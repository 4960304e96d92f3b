# OpenBao policy of the API service (AppRole `api`). Default deny: anything not listed is refused.
# The API authenticates clients, seals jobs for the worker and opens results for their owners. It
# must never mint worker credentials, read task secrets, open jobs, or obtain result keys.

# Client registry: look up a client's public key and policy by key id.
path "kv/data/appliance/clients/*" {
  capabilities = ["read"]
}
path "kv/metadata/appliance/clients/*" {
  capabilities = ["list"]
}

# Seal a job: a fresh data key bound to the job's context; the worker alone can unwrap it.
path "transit/datakey/plaintext/jobs" {
  capabilities = ["update"]
}

# Open a result the worker sealed, after checking that it belongs to the requesting client.
path "transit/decrypt/results" {
  capabilities = ["update"]
}

# HMACs of idempotency records (and, before issue 16, of task messages).
path "transit/hmac/task-signing" {
  capabilities = ["update"]
}

# Sign the task message (Ed25519), so that the worker runs only what the API accepted.
path "transit/sign/task-messages" {
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

# Its Redis user: a short-lived one from the database engine (rules from policies/redis-acl.json),
# renewed at half-life and replaced when renewal fails (a revoked lease) or nears its max TTL.
path "database/creds/api" {
  capabilities = ["read"]
}
path "sys/leases/renew" {
  capabilities = ["update"]
}

# Its own next secret_id (issue 12, finding 5): at each login the service mints the single-use,
# expiring secret_id of its next login, for its own role only (never another service's), with
# metadata naming where it runs. Nothing else of the AppRole: no role_id, no list, no destroy.
path "auth/approle/role/api/secret-id" {
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
