# OpenBao policy of `appliance backup` and `restore` (issue 15). Default deny.
# Raft snapshots only: a snapshot is OpenBao's storage as its barrier encrypted it, useless without
# the unseal key, so this token reads no secret, key or registry entry in the clear. Restoring
# (force: the snapshot of this very cluster, or of one with the same unseal key) replaces the
# storage; it is done by `appliance restore`, which stops the services first.
path "sys/storage/raft/snapshot" {
  capabilities = ["read", "update"]
}
path "sys/storage/raft/snapshot-force" {
  capabilities = ["update"]
}

# Its own token.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
