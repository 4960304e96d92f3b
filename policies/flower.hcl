# OpenBao policy of Flower (AppRole `flower`). Default deny: anything not listed is refused.
# The Flower launcher reads its own basic-auth credential once, at start-up, then revokes its
# token. It never sees the client registry, task secrets, transit keys or other AppRoles.

# Its basic-auth credential (username and password), made by the bootstrap.
path "kv/data/appliance/flower" {
  capabilities = ["read"]
}

# Its own next secret_id (issue 12, finding 5): at each login the service mints the single-use,
# expiring secret_id of its next login, for its own role only (never another service's), with
# metadata naming where it runs. Nothing else of the AppRole: no role_id, no list, no destroy.
path "auth/approle/role/flower/secret-id" {
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
