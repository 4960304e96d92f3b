# OpenBao policy of Flower (AppRole `flower`). Default deny: anything not listed is refused.
# The Flower launcher reads its own basic-auth credential once, at start-up, then revokes its
# token. It never sees the client registry, task secrets, transit keys or other AppRoles.

# Its basic-auth credential (username and password), made by the bootstrap.
path "kv/data/appliance/flower" {
  capabilities = ["read"]
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
