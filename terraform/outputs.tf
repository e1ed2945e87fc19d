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

output "volume_devices" {
  description = "Per encrypted volume, the `device:` for the image config's encrypted_volumes."
  value       = { for name, volume in digitalocean_volume.encrypted : name => "/dev/disk/by-id/scsi-0DO_Volume_${volume.name}" }
}

output "volume_transit_keys" {
  description = "Per encrypted volume, the Transit key (`transit_key:` in the image config) that wraps its data key."
  value       = { for name, key in vault_transit_secret_backend_key.volume : name => key.name }
}
