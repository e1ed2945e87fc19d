output "droplet_id" {
  value = digitalocean_droplet.app.id
}

output "ipv4_address" {
  value = digitalocean_droplet.app.ipv4_address
}

output "role_name" {
  value = vault_approle_auth_backend_role.droplet.role_name
}

output "wrapping_accessor" {
  description = "Accessor of the wrapping token: safe to log, lets an operator look it up or revoke it."
  value       = vault_approle_auth_backend_role_secret_id.droplet.wrapping_accessor
}

output "user_data_bytes" {
  value = module.user_data.user_data_bytes
}

output "transit_key" {
  description = "The Transit key wrapping the droplet's data keys (`transit_mount`/keys/<this>)."
  value       = local.transit_key
}
