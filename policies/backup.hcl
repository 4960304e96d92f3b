# OpenBao policy of `appliance backup` (issue 15). Default deny.
# Raft snapshots, read only: a snapshot is OpenBao's storage as its barrier encrypted it, useless
# without the unseal key, so this token reads no secret, key or registry entry in the clear. It
# cannot restore one: `appliance restore` does that with a root token generated from the unseal
# shares (red-team finding M1), through the endpoint that checks the snapshot is this cluster's.
path "sys/storage/raft/snapshot" {
  capabilities = ["read"]
}

# The transit key `backup` (Ed25519) that signs each backup's manifest, so that a restore takes
# only archives this appliance made (age alone authenticates nothing: finding M2). This token
# creates it on first use (transit takes a create as an update; type ed25519 only: never
# exportable) and signs with it; a key of its
# own, since a token that may sign with `audit` or `task-messages` could forge what they sign.
path "transit/keys/backup" {
  capabilities = ["create", "update", "read"]
  allowed_parameters = {
    "type" = ["ed25519"]
  }
}
path "transit/sign/backup" {
  capabilities = ["update"]
}

# Its own token.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
