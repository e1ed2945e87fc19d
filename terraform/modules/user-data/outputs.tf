output "user_data" {
  description = "The rendered #cloud-config for the droplet's user_data (holds the wrapped secret-id)."
  value       = local.user_data
  sensitive   = true

  precondition {
    condition     = local.user_data_bytes <= local.user_data_limit
    error_message = "The rendered user-data is ${local.user_data_bytes} bytes, over DigitalOcean's limit of 65536 bytes (64 KiB). The bootstrap itself is small: drop entries from ssh_authorized_keys (register the keys with DigitalOcean and pass them in the droplet's ssh_keys instead) or move other content out of user-data."
  }
}

output "user_data_bytes" {
  description = "Size of the rendered user-data in bytes (DigitalOcean's limit is 65536)."
  value       = local.user_data_bytes
}
