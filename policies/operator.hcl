# OpenBao policy of the operator (the `appliance` CLI: `clients add`, key rotation). Default deny.
# The operator manages who may submit and rotates keys; it cannot decrypt jobs or results, export
# or delete keys, read task secrets (it may write them), or log in as a service.

# Client registry: full management, including soft delete, undelete and destroy of versions.
path "kv/data/appliance/clients/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
path "kv/metadata/appliance/clients/*" {
  capabilities = ["read", "update", "delete", "list"]
}
path "kv/delete/appliance/clients/*" {
  capabilities = ["update"]
}
path "kv/undelete/appliance/clients/*" {
  capabilities = ["update"]
}
path "kv/destroy/appliance/clients/*" {
  capabilities = ["update"]
}

# Task secrets: write-only. Workers read them; the operator provisions them without reading back.
path "kv/data/appliance/secrets/*" {
  capabilities = ["create", "update", "delete"]
}
path "kv/metadata/appliance/secrets/*" {
  capabilities = ["list", "delete"]
}

# Flower's basic-auth credential: read only (`appliance flower-credentials`); the bootstrap makes
# it and only Flower's AppRole reads it otherwise.
path "kv/data/appliance/flower" {
  capabilities = ["read"]
}

# Transit key metadata (versions, and the public key of `audit` for offline verification).
path "transit/keys" {
  capabilities = ["list"]
}
path "transit/keys/*" {
  capabilities = ["read", "list"]
}

# Rotate keys, and move the minimum versions (retire old ones). Only these configuration
# parameters: never `exportable`, `allow_plaintext_backup` or `deletion_allowed`.
path "transit/keys/+/rotate" {
  capabilities = ["update"]
}
path "transit/keys/+/config" {
  capabilities = ["update"]
  allowed_parameters = {
    "min_decryption_version" = []
    "min_encryption_version" = []
    "auto_rotate_period"     = []
  }
}
path "transit/keys/+/trim" {
  capabilities = ["update"]
}

# Audit anchors: read and list only (`appliance audit verify`). The operator neither signs
# checkpoints nor creates anchors (issue 12, finding 7): the services sign the entries it writes.
path "kv/data/appliance/audit/anchors/*" {
  capabilities = ["read"]
}
path "kv/metadata/appliance/audit/anchors" {
  capabilities = ["list"]
}
path "kv/metadata/appliance/audit/anchors/" {
  capabilities = ["list"]
}

# Service identities (issue 12, finding 5): see which secret_ids exist for each service role
# (accessor, metadata, expiry, uses left) and destroy them. Never read a role_id or mint a
# secret_id: the operator cannot log in as a service. Only the bootstrap (a root token that lives
# inside `appliance up`) enrols a service, and a service mints only its own successor.
path "auth/approle/role" {
  capabilities = ["list"]
}
path "auth/approle/role/+/secret-id" {
  capabilities = ["list"]
}
path "auth/approle/role/+/secret-id-accessor/lookup" {
  capabilities = ["update"]
}
path "auth/approle/role/+/secret-id-accessor/destroy" {
  capabilities = ["update"]
}

# A stolen service token can mint secret_ids of its role: `identities destroy ROLE --all` also
# revokes every token of the role, found by accessor (lookups show metadata, never the token).
# Revoking only makes services stop (which the operator can do anyway); it grants nothing.
path "auth/token/accessors" {
  capabilities = ["list", "sudo"]
}
path "auth/token/lookup-accessor" {
  capabilities = ["update"]
}
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}

# Generate a root token for `appliance up`'s bootstrap (revoked when it is done). OpenBao 2.6+
# refuses the unauthenticated `sys/generate-root/*`: this authenticated flow needs this token AND a
# quorum of unseal key shares, so neither the token alone nor the shares alone make a root token.
path "sys/generate-root-token/attempt" {
  capabilities = ["read", "update", "delete"]
}
path "sys/generate-root-token/update" {
  capabilities = ["update"]
}

# Its own token.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
